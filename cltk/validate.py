"""A run config checked as a whole, above its schema (:mod:`cltk.config`): each key's range, the DeepSpeed
JSON against the run config's batch sizes, each active method's checks and the combinations no method can
judge alone. :func:`load_config` reads, parses and checks a run config: the one way in.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from cltk import registry
from cltk.config import RunConfig, parse_config
from cltk.ds_config import check_deepspeed_json
from cltk.errors import ConfigError
from cltk.typed_config import read_raw


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    raw: dict[str, Any] | None = None,
    world_size: int | None = None,
) -> RunConfig:
    """Load and validate a run config from a YAML file (or a raw mapping).

    Args:
        path: the YAML file; relative paths inside it resolve against its directory.
        overrides: ``key.sub=value`` assignments applied on top (``--set`` on the command line).
        raw: a mapping used instead of a file (``base_dir`` is then the current directory).
        world_size: ranks the run will have, for the batch check; default ``$WORLD_SIZE`` or 1.
    """
    base = Path.cwd()
    if raw is None:
        if path is None:
            raise ConfigError("", "give a config file (--config RUN.yaml)")
        raw, base = read_raw(path)
    cfg = parse_config(raw, base, overrides)
    validate(cfg, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    return cfg


def _positive(value: float, key: str, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(key, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: RunConfig, world_size: int = 1) -> None:
    """Check a config as a whole; raise :class:`ConfigError` naming the key and the fix."""
    _check_model_and_tokenizer(cfg)
    _check_domains(cfg)
    _check_train(cfg, world_size)
    check_deepspeed_json(cfg, world_size)
    check_methods(cfg)
    from cltk.model_checks import check_model

    check_model(cfg)


def _check_model_and_tokenizer(cfg: RunConfig) -> None:
    from cltk.data.tokenizer import MIN_VOCAB_SIZE

    m = cfg.model
    given = [k for k in ("init_from", "gguf", "config") if getattr(m, k)]
    if len(given) != 1:
        raise ConfigError(
            "model", f"give exactly one of init_from, gguf or config (got {given or 'none'})"
        )
    for key in ("init_from", "gguf"):
        val = getattr(m, key)
        if val and not cfg.resolve(val).exists():  # type: ignore[union-attr]
            raise ConfigError(f"model.{key}", f"{cfg.resolve(val)} does not exist")
    if m.config is not None and "model_type" not in m.config:
        raise ConfigError(
            "model.config.model_type", "an inline config needs model_type (e.g. llama)"
        )
    tok = cfg.tokenizer
    if tok.path and tok.train:
        raise ConfigError("tokenizer", "give either path or train, not both")
    if tok.path and not cfg.resolve(tok.path).exists():  # type: ignore[union-attr]
        raise ConfigError("tokenizer.path", f"{cfg.resolve(tok.path)} does not exist")
    if m.config is not None and not (tok.path or tok.train):
        raise ConfigError(
            "tokenizer",
            "a model built from an inline config needs tokenizer.path or "
            "tokenizer.train: {vocab_size: N}",
        )
    if tok.train:
        _positive(tok.train.max_chars_per_domain, "tokenizer.train.max_chars_per_domain")
    if tok.train and tok.train.vocab_size < MIN_VOCAB_SIZE:
        raise ConfigError(
            "tokenizer.train.vocab_size",
            f"must be >= {MIN_VOCAB_SIZE} (specials and the 256 "
            f"byte tokens need room), got {tok.train.vocab_size}",
        )


def _check_domains(cfg: RunConfig) -> None:
    from cltk.data.corpora import CorpusError, check_source

    if not 0 <= cfg.seed < 2**32:
        raise ConfigError("seed", f"must be in [0, 2**32), got {cfg.seed}")
    if not cfg.domains:
        raise ConfigError(
            "domains", "list at least one domain: [{name: code, source: {builtin: stdlib}}]"
        )
    seen = set()
    for i, d in enumerate(cfg.domains):
        key = f"domains[{i}]"
        if not d.name or not d.name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(
                f"{key}.name", f"needs a name of letters, digits, - and _, got {d.name!r}"
            )
        if d.name in seen:
            raise ConfigError(f"{key}.name", f"domain name {d.name!r} is used twice")
        seen.add(d.name)
        if d.max_chars is not None:
            _positive(d.max_chars, f"{key}.max_chars")
        try:
            check_source(d.source, domain=d.name)
        except CorpusError as e:
            raise ConfigError(f"{key}.source", str(e)) from e
    if not cfg.train_domains():
        raise ConfigError("domains", "every domain is eval_only: nothing to train")


def _check_train(cfg: RunConfig, world_size: int) -> None:
    _positive(cfg.data.seq_len, "data.seq_len")
    if cfg.data.seq_len < 2:
        raise ConfigError("data.seq_len", "must be >= 2: each token learns to predict the next one")
    _positive(cfg.data.eval_sequences, "data.eval_sequences")
    t = cfg.train
    _positive(t.micro_batch_size, "train.micro_batch_size")
    _positive(t.gradient_accumulation_steps, "train.gradient_accumulation_steps")
    _positive(t.lr, "train.lr")
    _positive(t.epochs, "train.epochs")
    _positive(t.warmup_steps, "train.warmup_steps", allow_zero=True)
    _positive(t.checkpoint_every, "train.checkpoint_every", allow_zero=True)
    if t.max_steps_per_stage is not None:
        _positive(t.max_steps_per_stage, "train.max_steps_per_stage")
    _positive(t.grad_clip, "train.grad_clip", allow_zero=True)
    _positive(t.weight_decay, "train.weight_decay", allow_zero=True)
    _positive(t.keep_checkpoints, "train.keep_checkpoints")
    _positive(t.log_every, "train.log_every")
    _positive(cfg.eval.batch_size, "eval.batch_size")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError("train.betas", f"must be two numbers in [0, 1), got {t.betas}")
    if not 0 <= t.min_lr_ratio <= 1:
        raise ConfigError("train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    if not 0 < t.decay_share <= 1:
        raise ConfigError("train.decay_share", f"must be in (0, 1], got {t.decay_share}")
    expected = cfg.global_batch(world_size)
    if t.train_batch_size is not None and t.train_batch_size != expected:
        raise ConfigError(
            "train.train_batch_size",
            f"{t.train_batch_size} != micro_batch_size {t.micro_batch_size} x "
            f"gradient_accumulation_steps {t.gradient_accumulation_steps} x world size {world_size} "
            f"= {expected}; change one of them or drop train_batch_size",
        )


def check_methods(cfg: RunConfig) -> None:
    """Each active method's own checks, then the combinations no method can judge alone."""
    active = registry.active(cfg)
    for spec, section in active:
        spec.check(cfg, section)
    replacers = [spec.name for spec, section in active if spec.replaces_loss(section)]
    if len(replacers) > 1:
        raise ConfigError(
            replacers[1],
            f"{' and '.join(replacers)} each replace the main loss (only one can); choose one of them",
        )
    if cfg.train.joint and active:
        raise ConfigError(
            "train.joint",
            f"joint training is the plain-training bound of a benchmark; it runs no method, but "
            f"{', '.join(spec.name for spec, _ in active)} is on: turn one of them off",
        )
    frozen = [spec.name for spec, section in active if spec.freezes_base(section)]
    on_base = [spec.name for spec, _ in active if spec.acts_on_base]
    if frozen and on_base:
        raise ConfigError(
            on_base[0],
            f"{on_base[0]} acts on the base model's weights, but with {frozen[0]} only the adapters "
            f"train, so it would protect nothing; use one of {on_base[0]} or {frozen[0]}",
        )
