"""The continual NER run config: typed sections, loaded from YAML and checked before any work.

A run is a sequence of **steps**; each names the entity types it introduces and its training data,
which annotates only those types (the teacher's soft targets keep the old ones). A held-out set
annotated with every type is evaluated after each step. See ``docs/ner.md`` and
``examples/ner/brown.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cltk.config import _convert, read_raw
from cltk.errors import UserError

VARIANTS = ("addner", "extendner")
_TYPE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class NerConfigError(UserError):
    """A NER run config that cannot run; the message names the key (and file) and the fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)


@dataclass
class DistillConfig:
    """alpha * T^2 * KL(teacher || student) on the old types + beta * CE on the new types' labels."""

    alpha: float = 1.0  # weight of the distillation term
    beta: float = 1.0  # weight of the cross-entropy on the new labels
    temperature: float = 2.0  # softens both distributions in the KL term


@dataclass
class NerModelConfig:
    config: dict[str, Any] | None = None  # inline transformers config (model_type: bert, ...)
    init_from: str | None = None  # an HF model directory (encoder or decoder)


@dataclass
class NerTokenizerConfig:
    path: str | None = None  # a transformers tokenizer directory; default: model.init_from's
    vocab_size: int | None = None  # or train one on the training words, of this size


@dataclass
class NerTrainConfig:
    steps: int = 100  # optimizer steps per continual step (the same budget for every method)
    micro_batch_size: int = 8  # sentences per rank per micro-batch
    gradient_accumulation_steps: int = 1
    lr: float = 1e-3
    warmup_steps: int = 0  # linear warmup at the start of each continual step
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0  # 0: off
    max_len: int = 128  # sub-tokens per sentence; words past it are predicted O
    log_every: int = 10


@dataclass
class StepConfig:
    name: str
    types: list[str]
    data: dict[str, Any]  # {path: FILE[, format: conll|jsonl]} or {brown: {...}}


@dataclass
class NerConfig:
    output_dir: str
    steps: list[StepConfig]
    eval: dict[str, Any]  # a data source annotated with every type
    deepspeed: str
    variant: str = "extendner"
    distill: DistillConfig | None = field(default_factory=DistillConfig)  # null: naive fine-tuning
    model: NerModelConfig = field(default_factory=NerModelConfig)
    tokenizer: NerTokenizerConfig = field(default_factory=NerTokenizerConfig)
    train: NerTrainConfig = field(default_factory=NerTrainConfig)
    seed: int = 0
    base_dir: str = "."  # the YAML file's directory: relative paths resolve against it

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


def _section(cls, raw: Any, key: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise NerConfigError(key, f"must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise NerConfigError(key, f"unknown key(s) {unknown}; known: {sorted(names)}")

    hints = typing.get_type_hints(cls)  # each value checked against its field type, key named
    return cls(**{k: _convert(v, hints[k], f"{key}.{k}") for k, v in raw.items()})


def _check_source(src: Any, key: str) -> None:
    if not isinstance(src, dict) or len(src.keys() & {"path", "brown"}) != 1:
        raise NerConfigError(
            key, "give one of {path: FILE.conll|FILE.jsonl} or {brown: {categories: [news], ...}}"
        )
    if "path" in src:
        fmt = src.get("format")
        if fmt is not None and fmt not in ("conll", "jsonl"):
            raise NerConfigError(f"{key}.format", f"must be conll or jsonl, got {fmt!r}")


def parse_config(raw: dict[str, Any], base_dir: str | Path = ".") -> NerConfig:
    """Build and check a :class:`NerConfig` from a mapping; raise :class:`NerConfigError`."""
    raw = json.loads(json.dumps(raw))
    known = {f.name for f in dataclasses.fields(NerConfig)} - {"base_dir"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise NerConfigError("", f"unknown key(s) {unknown}; known: {sorted(known)}")
    for key in ("output_dir", "steps", "eval", "deepspeed"):
        if not raw.get(key):
            raise NerConfigError(key, "is required (see examples/ner/brown.yaml)")
    if not isinstance(raw["steps"], list):
        raise NerConfigError("steps", "must be a list of {name, types, data}")
    steps = []
    for i, s in enumerate(raw["steps"]):
        if not isinstance(s, dict) or set(s) != {"name", "types", "data"}:
            raise NerConfigError(f"steps[{i}]", "must have exactly the keys name, types, data")
        steps.append(StepConfig(**s))
    distill = raw.get("distill", {})
    cfg = NerConfig(
        output_dir=raw["output_dir"],
        steps=steps,
        eval=raw["eval"],
        deepspeed=raw["deepspeed"],
        variant=raw.get("variant", "extendner"),
        distill=None if distill is None else _section(DistillConfig, distill, "distill"),
        model=_section(NerModelConfig, raw.get("model"), "model"),
        tokenizer=_section(NerTokenizerConfig, raw.get("tokenizer"), "tokenizer"),
        train=_section(NerTrainConfig, raw.get("train"), "train"),
        seed=_seed(raw.get("seed", 0)),
        base_dir=str(base_dir),
    )
    check_config(cfg)
    return cfg


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32:
        raise NerConfigError("seed", f"must be an integer in [0, 2**32), got {value!r}")
    return value


def check_config(cfg: NerConfig) -> None:
    """Checks that need no data: names, the steps' types, weights, model and files."""
    if cfg.variant not in VARIANTS:
        raise NerConfigError("variant", f"must be one of {VARIANTS}, got {cfg.variant!r}")
    introduced: dict[str, str] = {}
    names: set[str] = set()
    for i, s in enumerate(cfg.steps):
        if not isinstance(s.name, str) or not re.match(r"^[A-Za-z0-9_-]+$", s.name):
            raise NerConfigError(f"steps[{i}].name", f"letters, digits, - and _, got {s.name!r}")
        if s.name in names:
            raise NerConfigError(f"steps[{i}].name", f"step name {s.name!r} is used twice")
        names.add(s.name)
        if not isinstance(s.types, list) or not s.types:
            raise NerConfigError(f"steps[{i}].types", "list the entity types this step introduces")
        for t in s.types:
            if not isinstance(t, str) or not _TYPE_NAME.match(t):
                raise NerConfigError(
                    f"steps[{i}].types", f"type names are letters, digits and _, got {t!r}"
                )
            if t in introduced:
                raise NerConfigError(
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
            raise NerConfigError("distill", f"alpha, beta >= 0, not both 0; got {d.alpha}, {d.beta}")
        if d.temperature <= 0:
            raise NerConfigError("distill.temperature", f"must be > 0, got {d.temperature}")
    m = cfg.model
    if (m.config is None) == (m.init_from is None):
        raise NerConfigError("model", "give exactly one of config (inline) or init_from (HF dir)")
    if m.config is not None and "model_type" not in m.config:
        raise NerConfigError("model.config.model_type", "an inline config needs model_type")
    if m.init_from and not cfg.resolve(m.init_from).is_dir():  # type: ignore[union-attr]
        raise NerConfigError("model.init_from", f"{cfg.resolve(m.init_from)} is not a directory")
    tok = cfg.tokenizer
    if tok.path and tok.vocab_size:
        raise NerConfigError("tokenizer", "give either path or vocab_size (train one), not both")
    if m.config is not None and not (tok.path or tok.vocab_size):
        raise NerConfigError("tokenizer", "a model from an inline config needs path or vocab_size")
    t = cfg.train
    for key in ("steps", "micro_batch_size", "gradient_accumulation_steps", "max_len", "log_every"):
        if getattr(t, key) <= 0:
            raise NerConfigError(f"train.{key}", f"must be > 0, got {getattr(t, key)}")
    if t.lr <= 0 or t.warmup_steps < 0 or t.weight_decay < 0 or t.grad_clip < 0:
        raise NerConfigError("train", "lr > 0; warmup_steps, weight_decay, grad_clip >= 0")
    if not cfg.resolve(cfg.deepspeed).is_file():  # type: ignore[union-attr]
        raise NerConfigError("deepspeed", f"{cfg.resolve(cfg.deepspeed)} not found")


def load_ner_config(path: str | Path, overrides: list[str] | None = None) -> NerConfig:
    """Load ``path`` (YAML), apply ``key.sub=value`` overrides (values parsed as YAML), check."""
    raw, base = read_raw(path, overrides)
    return parse_config(raw, base)
