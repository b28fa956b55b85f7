"""Checks of a run config that a key's type and range let through, run by :func:`cltk.validate.validate`
before any work: each is a function of its own, raising :class:`ConfigError` with the key and the fix.

- ``output_dir`` must name a directory (an empty string would write the run into the config's own);
- every method section that is written is checked, whether or not its values turn the method on
  (``replay.share: -0.1`` is a mistake, not "replay off");
- an inline model's sizes (``hidden_size: 0``, ``num_hidden_layers: 0``) and a tokenizer larger than the
  embedding of the model it is meant for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cltk import registry
from cltk.errors import ConfigError

if TYPE_CHECKING:
    from cltk.config import RunConfig

# transformers' names of an inline model's sizes, each of which must be a positive integer when given
SIZE_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "vocab_size", "max_position_embeddings", "num_key_value_heads", "head_dim")


def check_output_dir(cfg: RunConfig) -> None:
    if not cfg.output_dir.strip():
        raise ConfigError(
            "output_dir", "is empty; name the run's own directory, e.g. output_dir: runs/my-run"
        )


def check_path_kinds(cfg: RunConfig) -> None:
    """Paths that exist but are the wrong kind: a model or tokenizer directory that is a file, a GGUF
    file that is a directory."""
    m, t = cfg.model, cfg.tokenizer
    for key, value, want_dir in (("model.init_from", m.init_from, True), ("model.gguf", m.gguf, False),
                                 ("tokenizer.path", t.path, True)):
        path = cfg.resolve(value)
        if path is None or not path.exists():
            continue
        if want_dir and not path.is_dir():
            raise ConfigError(key, f"{path} is a file; name the directory save_pretrained wrote")
        if not want_dir and path.is_dir():
            raise ConfigError(key, f"{path} is a directory; name the .gguf file in it")


def check_written_sections(cfg: RunConfig) -> None:
    """Each method section that is written but does not turn its method on, checked all the same."""
    for spec in registry.specs():
        section = cfg.sections.get(spec.name)
        if section is not None and not spec.active(section):
            spec.check(cfg, section)


def check_inline_sizes(config: Any) -> None:
    """An inline model's sizes, read from its transformers config (aliases such as ``n_embd`` too)."""
    for key in SIZE_KEYS:
        value = getattr(config, key, None)
        if value is None or isinstance(value, bool) or not isinstance(value, int):
            continue
        if value < 1:
            raise ConfigError(f"model.config.{key}", f"must be a positive integer, got {value}")


def check_tokenizer_fits(cfg: RunConfig, model_vocab: int | None) -> None:
    """A configured tokenizer larger than the named model's embedding (a mismatched pair), refused
    before any data is prepared. Only ``tokenizer.path`` and ``tokenizer.train`` are knowable here."""
    if model_vocab is None:
        return
    t = cfg.tokenizer
    if t.train is not None:
        n, what = t.train.vocab_size, f"tokenizer.train.vocab_size {t.train.vocab_size}"
        key = "tokenizer.train.vocab_size"
    elif t.path:
        from cltk.data.tokenizer import load_tokenizer

        n, key = len(load_tokenizer(cfg.resolve(t.path))), "tokenizer.path"
        what = f"the tokenizer at {cfg.resolve(t.path)} has {n} tokens"
    else:
        return
    if n > model_vocab:
        raise ConfigError(
            key,
            f"{what}, but the model's embedding has {model_vocab} rows: they do not belong "
            "together; use the model's own tokenizer or a model built for this one",
        )


def check_model_extras(cfg: RunConfig) -> None:
    """What :func:`cltk.model_checks.check_model` does not see: an inline model's sizes, an
    ``init_from`` directory's weight files, and a tokenizer larger than the model's embedding."""
    from cltk import model_checks

    m = cfg.model
    if m.config is not None:
        config = model_checks.inline_config(cfg)
        check_inline_sizes(config)
        check_tokenizer_fits(cfg, m.config.get("vocab_size") if "vocab_size" in m.config else None)
    elif m.init_from:
        from cltk.model_files import check_weights_dir

        path = cfg.resolve(m.init_from)
        check_weights_dir(path, "model.init_from")  # type: ignore[arg-type]
        config = model_checks._model_dir_config(path)  # type: ignore[arg-type]
        check_tokenizer_fits(cfg, getattr(config, "vocab_size", None))
