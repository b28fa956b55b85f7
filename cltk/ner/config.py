"""The continual NER run config: typed sections, loaded from YAML and checked before any work.

A run is a sequence of **steps**; each names the entity types it introduces and its training data,
which annotates only those types (the teacher's soft targets keep the old ones). A held-out set
annotated with every type is evaluated after each step. See ``docs/ner.md`` and
``examples/ner/brown.yaml``.

The schema loads through the machinery of the run config (:mod:`cltk.typed_config`: types, help,
did-you-mean, ``--set`` overrides, :class:`~cltk.errors.ConfigError` naming the key), and
``cltk config-reference --ner`` prints its reference.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cltk import typed_config
from cltk.ds_config import check_deepspeed_json
from cltk.errors import ConfigError
from cltk.typed_config import option, read_raw

VARIANTS = ("addner", "extendner")
_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


@dataclass
class DistillConfig:
    """alpha * T^2 * KL(teacher || student) on the old types + beta * CE on the new types' labels."""

    alpha: float = option("weight of the distillation term", 1.0)
    beta: float = option("weight of the cross-entropy on the new labels", 1.0)
    temperature: float = option("softens both distributions in the KL term", 2.0)


@dataclass
class NerModelConfig:
    config: dict[str, Any] | None = option("inline transformers config (model_type: bert, ...)", None)
    init_from: str | None = option("an HF model directory (encoder or decoder)", None)


@dataclass
class NerTokenizerConfig:
    path: str | None = option(
        "a transformers tokenizer directory; default: model.init_from's", None
    )
    vocab_size: int | None = option("or train one on the training words, of this size", None)


@dataclass
class NerTrainConfig:
    steps: int = option(
        "optimizer steps per continual step (the same budget for every method)", 100
    )
    micro_batch_size: int = option("sentences per rank per micro-batch", 8)
    gradient_accumulation_steps: int = option("micro-batches per optimizer step", 1)
    lr: float = option("peak learning rate (AdamW)", 1e-3)
    warmup_steps: int = option(
        "linear warmup at the start of each continual step, then constant", 0
    )
    weight_decay: float = option("AdamW weight decay of matrices (not biases or norms)", 0.01)
    betas: list[float] = option("AdamW betas", factory=lambda: [0.9, 0.999])
    grad_clip: float = option("global gradient-norm clipping; 0: off", 1.0)
    max_len: int = option("sub-tokens per sentence; words past it are predicted O", 128)
    log_every: int = option("optimizer steps between lines of train_log.jsonl", 10)


@dataclass
class StepConfig:
    name: str = option("the step's name (letters, digits, - and _)")
    types: list[str] = option("the entity types this step introduces")
    data: dict[str, Any] = option(
        "its training data: {path: FILE[, format: conll|jsonl]} or {brown: {...}}"
    )


@dataclass
class NerConfig:
    output_dir: str = option("where the taggers and the F1 matrix go (required)", "")
    steps: list[StepConfig] = option("the continual steps, in order (required)", factory=list)
    eval: dict[str, Any] = option(
        "held-out data annotated with every type, as a step's data (required)", factory=dict
    )
    deepspeed: str = option("DeepSpeed JSON (ZeRO and precision), required", "")
    variant: Literal["addner", "extendner"] = option(
        "addner: one output layer per step; extendner: one layer, new columns", "extendner"
    )
    distill: DistillConfig | None = option(
        "distillation from the previous step's tagger; null: naive fine-tuning",
        factory=DistillConfig,
    )
    model: NerModelConfig = option("the backbone", factory=NerModelConfig)
    tokenizer: NerTokenizerConfig = option("the tokenizer", factory=NerTokenizerConfig)
    train: NerTrainConfig = option("optimisation", factory=NerTrainConfig)
    seed: int = option("seed of data order and new layers", 0)
    base_dir: str = option("the YAML file's directory: relative paths resolve against it", ".")

    def resolve(self, p: str | None) -> Path | None:
        if p is None:
            return None
        q = Path(p).expanduser()
        return q if q.is_absolute() else Path(self.base_dir) / q

    @property
    def out(self) -> Path:
        return self.resolve(self.output_dir)  # type: ignore[return-value]

    def all_types(self) -> list[str]:
        """Every type, in the order the steps introduce them."""
        return [t for s in self.steps for t in s.types]


def parse_config(
    raw: dict[str, Any], base_dir: str | Path = ".", overrides: list[str] | None = None
) -> NerConfig:
    """Build and check a :class:`NerConfig` from a mapping; raise :class:`ConfigError`."""
    raw = json.loads(json.dumps(raw))
    for o in overrides or []:
        typed_config.set_override(raw, o)
    for key in ("output_dir", "steps", "eval", "deepspeed"):
        if not raw.get(key):
            raise ConfigError(key, "is required (see examples/ner/brown.yaml)")
    cfg = typed_config.build(NerConfig, raw)
    cfg.base_dir = str(base_dir)
    check_config(cfg)
    return cfg


def describe() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows of every NER config key, for ``cltk config-reference --ner``."""
    return typed_config.describe(NerConfig)


def _check_source(src: Any, key: str) -> None:
    if not isinstance(src, dict) or len(src.keys() & {"path", "brown"}) != 1:
        raise ConfigError(
            key, "give one of {path: FILE.conll|FILE.jsonl} or {brown: {categories: [news], ...}}"
        )
    if "path" in src:
        fmt = src.get("format")
        if fmt is not None and fmt not in ("conll", "jsonl"):
            raise ConfigError(f"{key}.format", f"must be conll or jsonl, got {fmt!r}")


def check_config(cfg: NerConfig) -> None:
    """Checks that need no data: names, the steps' types, weights, model and files."""
    introduced: dict[str, str] = {}
    names: set[str] = set()
    for i, s in enumerate(cfg.steps):
        if not isinstance(s.name, str) or not re.match(r"^[A-Za-z0-9_-]+$", s.name):
            raise ConfigError(f"steps[{i}].name", f"letters, digits, - and _, got {s.name!r}")
        if s.name in names:
            raise ConfigError(f"steps[{i}].name", f"step name {s.name!r} is used twice")
        names.add(s.name)
        if not isinstance(s.types, list) or not s.types:
            raise ConfigError(f"steps[{i}].types", "list the entity types this step introduces")
        for t in s.types:
            if not isinstance(t, str) or not _TYPE_NAME.match(t):
                raise ConfigError(
                    f"steps[{i}].types", f"type names are letters, digits and _, got {t!r}"
                )
            if t in introduced:
                raise ConfigError(
                    f"steps[{i}].types",
                    f"step {s.name!r} reintroduces type {t!r}, introduced by step "
                    f"{introduced[t]!r}; each step introduces new types only (its data annotates "
                    "only them, the teacher keeps the old ones)",
                )
            introduced[t] = s.name
        _check_source(s.data, f"steps[{i}].data")
    _check_source(cfg.eval, "eval")
    d = cfg.distill
    if d is not None:
        if d.alpha < 0 or d.beta < 0 or d.alpha + d.beta == 0:
            raise ConfigError("distill", f"alpha, beta >= 0, not both 0; got {d.alpha}, {d.beta}")
        if d.temperature <= 0:
            raise ConfigError("distill.temperature", f"must be > 0, got {d.temperature}")
    m = cfg.model
    if (m.config is None) == (m.init_from is None):
        raise ConfigError("model", "give exactly one of config (inline) or init_from (HF dir)")
    if m.config is not None and "model_type" not in m.config:
        raise ConfigError("model.config.model_type", "an inline config needs model_type")
    if m.init_from and not cfg.resolve(m.init_from).is_dir():  # type: ignore[union-attr]
        raise ConfigError("model.init_from", f"{cfg.resolve(m.init_from)} is not a directory")
    tok = cfg.tokenizer
    if tok.path and tok.vocab_size:
        raise ConfigError("tokenizer", "give either path or vocab_size (train one), not both")
    if m.config is not None and not (tok.path or tok.vocab_size):
        raise ConfigError("tokenizer", "a model from an inline config needs path or vocab_size")
    t = cfg.train
    for key in ("steps", "micro_batch_size", "gradient_accumulation_steps", "max_len", "log_every"):
        if getattr(t, key) <= 0:
            raise ConfigError(f"train.{key}", f"must be > 0, got {getattr(t, key)}")
    if t.lr <= 0 or t.warmup_steps < 0 or t.weight_decay < 0 or t.grad_clip < 0:
        raise ConfigError("train", "lr > 0; warmup_steps, weight_decay, grad_clip >= 0")
    check_deepspeed_json(cfg, int(os.environ.get("WORLD_SIZE", "1")))


def load_ner_config(path: str | Path, overrides: list[str] | None = None) -> NerConfig:
    """Load ``path`` (YAML), apply ``key.sub=value`` overrides (values parsed as YAML), check."""
    raw, base = read_raw(path, overrides)
    return parse_config(raw, base)
