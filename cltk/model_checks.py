"""Checks of the model a config names, before any work: what transformers would reject only at the first
forward (or accept silently), found from the model's config alone (no weights are loaded).

- an inline ``model.config``: an unknown ``model_type`` (the closest causal-LM types are named), a key
  that is a near miss of one the model type has (a typo like ``hiden_size`` is otherwise ignored), heads
  that do not divide the hidden size, KV heads that do not divide the heads;
- ``model.init_from``: a directory that holds no transformers config;
- ``model.gguf``: a file that is not GGUF (its positions are read from the header alone);
- ``data.seq_len`` beyond the model's positions (``max_position_embeddings`` / ``n_positions``).
"""

from __future__ import annotations

import difflib
import inspect
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from cltk.errors import ConfigError

if TYPE_CHECKING:
    from cltk.config import RunConfig

GGUF_MAGIC = b"GGUF"
# Config attributes every transformers model accepts (PretrainedConfig's own arguments), beyond the
# model type's own.
_COMMON_KEYS = frozenset(
    {
        "vocab_size",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "tie_word_embeddings",
        "torch_dtype",
        "dtype",
        "architectures",
        "name_or_path",
        "attn_implementation",
        "use_cache",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "is_decoder",
        "chunk_size_feed_forward",
        "problem_type",
        "tokenizer_class",
        "transformers_version",
    }
)


def causal_lm_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _closest(word: str, choices: list[str], n: int = 5) -> str:
    close = difflib.get_close_matches(word, choices, n=n, cutoff=0.5)
    return ", ".join(close) if close else ", ".join(c for c in choices[:n])


def inline_config(cfg: RunConfig) -> Any:
    """The transformers config of an inline ``model.config`` (vocab size left at the type's default)."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    spec = dict(cfg.model.config or {})
    model_type = spec.pop("model_type")
    types = causal_lm_types()
    if model_type not in types:
        raise ConfigError(
            "model.config.model_type",
            f"{model_type!r} is not a causal LM model type of transformers; closest: "
            f"{_closest(str(model_type), types)}",
        )
    config_class = CONFIG_MAPPING[model_type]
    try:
        known = set(config_class().to_dict()) | set(inspect.signature(config_class).parameters)
    except Exception:  # noqa: BLE001 - a config class without defaults: leave its keys unchecked
        known = set()
    known |= _COMMON_KEYS
    for key in spec:
        # transformers still takes legacy names (rope_theta, rotary_pct...) that its configs no longer
        # list, so only a near miss of a listed name is taken as a typo
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.85)
        if key not in known and close:
            raise ConfigError(
                f"model.config.{key}",
                f"{model_type} has no such setting; did you mean {close[0]!r}?",
            )
    _check_heads(spec, model_type)
    try:
        return AutoConfig.for_model(model_type, **spec)
    except Exception as e:  # noqa: BLE001 - transformers raises several kinds for a bad config
        cause = e.__cause__ if e.__cause__ is not None else e
        raise ConfigError("model.config", f"transformers rejects it: {cause}") from e


def _check_heads(spec: dict[str, Any], model_type: str) -> None:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    defaults = CONFIG_MAPPING[model_type]()
    attr_map = getattr(defaults, "attribute_map", {}) or {}

    def get(name: str, default: bool = True) -> Any:
        for k in (name, *[a for a, b in attr_map.items() if b == name]):
            if k in spec:
                return spec[k]
        return getattr(defaults, name, None) if default else None

    hidden, heads = get("hidden_size"), get("num_attention_heads")
    kv = get(
        "num_key_value_heads", default=False
    )  # unset: transformers makes it equal to the heads
    explicit_head_dim = "head_dim" in spec
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0:
        if hidden % heads and not explicit_head_dim:
            raise ConfigError(
                "model.config.num_attention_heads",
                f"{heads} heads do not divide hidden_size {hidden}; choose heads that divide it "
                f"(e.g. {', '.join(str(h) for h in range(1, min(hidden, 64) + 1) if hidden % h == 0)})",
            )
        if isinstance(kv, int) and kv > 0 and heads % kv:
            raise ConfigError(
                "model.config.num_key_value_heads",
                f"{kv} KV heads do not divide num_attention_heads {heads}; each KV head serves a "
                f"whole group of query heads (use one of "
                f"{', '.join(str(h) for h in range(1, heads + 1) if heads % h == 0)})",
            )


def _model_dir_config(path: Path) -> Any:
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ConfigError(
            "model.init_from",
            f"{path} is not a transformers model directory (no config.json); point it at a "
            "directory written by save_pretrained, or use model.gguf for a .gguf file",
        )
    try:
        return AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a broken config.json fails in many ways
        raise ConfigError("model.init_from", f"cannot read {path / 'config.json'}: {e}") from e


def check_gguf_file(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ConfigError(
            "model.gguf",
            f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); for a "
            "transformers model directory use model.init_from",
        )


# GGUF metadata value types of fixed size (the format's type ids), as struct formats
_GGUF_SCALARS = {
    0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d",
}  # fmt: skip
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file, read from its header alone (tens of ms, where
    transformers and ``gguf.GGUFReader`` index every tensor first, seconds). Arrays (the vocabulary) are
    skipped; an unexpected layout ends the reading with what was read so far."""
    out: dict[str, Any] = {}
    with open(path, "rb") as f:

        def read(fmt: str) -> Any:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def string() -> str:
            return f.read(read("<Q")).decode("utf-8", "replace")

        try:
            if f.read(4) != GGUF_MAGIC:
                return out
            read("<I")  # version
            read("<Q")  # tensor count
            for _ in range(read("<Q")):
                key, kind = string(), read("<I")
                if kind in _GGUF_SCALARS:
                    out[key] = read(_GGUF_SCALARS[kind])
                elif kind == _GGUF_STRING:
                    out[key] = string()
                elif kind == _GGUF_ARRAY:
                    item, count = read("<I"), read("<Q")
                    if item in _GGUF_SCALARS:
                        f.seek(count * struct.calcsize(_GGUF_SCALARS[item]), 1)
                    elif item == _GGUF_STRING:
                        for _ in range(count):
                            f.seek(read("<Q"), 1)
                    else:
                        return out
                else:
                    return out
        except (struct.error, OSError):
            return out
    return out


def gguf_positions(path: Path) -> Any:
    """A stand-in config holding the GGUF model's positions (``<arch>.context_length``), for
    :func:`check_positions`."""
    meta = gguf_metadata(path)
    n = meta.get(f"{meta.get('general.architecture')}.context_length")
    return SimpleNamespace(max_position_embeddings=n if isinstance(n, int) else None)


def max_positions(config: Any) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(config: Any, seq_len: int, inline: bool = False) -> None:
    """Refuse ``data.seq_len`` beyond the positions the model has."""
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            "data.seq_len",
            f"{seq_len} tokens per sequence, but the model has {limit} positions "
            "(max_position_embeddings); training past them uses positions the model never learned. "
            f"Lower data.seq_len to <= {limit}"
            + (" or raise model.config.max_position_embeddings" if inline else ""),
        )


def check_model(cfg: RunConfig) -> None:
    """Every check above that applies to the config's model; raises :class:`ConfigError`."""
    m = cfg.model
    if m.config is not None:
        check_positions(inline_config(cfg), cfg.data.seq_len, inline=True)
    elif m.init_from:
        check_positions(_model_dir_config(cfg.resolve(m.init_from)), cfg.data.seq_len)  # type: ignore[arg-type]
    elif m.gguf:
        path = cfg.resolve(m.gguf)
        check_gguf_file(path)  # type: ignore[arg-type]
        check_positions(gguf_positions(path), cfg.data.seq_len)  # type: ignore[arg-type]


def meta_model(cfg: RunConfig) -> Any | None:
    """The configured model built on the meta device (module names and shapes, no weights), or None
    for a GGUF file (its config is read when it loads)."""
    import torch
    from transformers import AutoModelForCausalLM

    m = cfg.model
    if m.config is not None:
        config = inline_config(cfg)
    elif m.init_from:
        config = _model_dir_config(cfg.resolve(m.init_from))  # type: ignore[arg-type]
    else:
        return None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)
