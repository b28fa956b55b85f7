"""Typed run configuration, loaded from one YAML file and validated before any work starts.

Every error names the offending key (``train.micro_batch_size``) and says how to fix it. The checks of a
config as a whole, and the DeepSpeed config cltk hands to ``deepspeed.initialize``, are in
:mod:`cltk.validate`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from cltk import registry
from cltk.errors import ConfigError


def option(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    kw: dict[str, Any] = {"metadata": {"help": text}}
    if factory is not dataclasses.MISSING:
        kw["default_factory"] = factory
    else:
        kw["default"] = default
    return field(**kw)


@dataclass
class ModelConfig:
    init_from: str | None = option("local HF model directory to start from (weights only)", None)
    gguf: str | None = option("a .gguf file to load into a trainable model (dequantised)", None)
    config: dict[str, Any] | None = option(
        "inline transformers config for a model built from scratch, e.g. {model_type: llama, ...}",
        None,
    )
    dtype: Literal["auto", "float32", "bfloat16"] = option(
        "weights dtype at load; auto follows the DeepSpeed precision", "auto"
    )

    def source(self) -> str:
        return "init_from" if self.init_from else "gguf" if self.gguf else "config"


@dataclass
class TokenizerTrainConfig:
    vocab_size: int = option("vocabulary size of the tokenizer trained on the corpora", 4096)
    max_chars_per_domain: int = option("characters of each domain used to train it", 1_000_000)


@dataclass
class TokenizerConfig:
    path: str | None = option("a transformers tokenizer directory; default: the model's own", None)
    train: TokenizerTrainConfig | None = option(
        "train a SentencePiece-style tokenizer on the corpora", None
    )


@dataclass
class DomainConfig:
    name: str = option("domain name (unique; used in file names and the forgetting matrix)", "")
    source: dict[str, Any] = option(
        "one of {builtin: NAME}, {files: GLOB}, {jsonl: PATH, field: text}, {hf_dataset: DIR, field}, "
        "or a mixture {mix: [{files: A, weight: 0.7}, {jsonl: B, weight: 0.3}]}",
        factory=dict,
    )
    max_chars: int | None = option(
        "read at most this many characters (a seeded sample of the source's files or 1 MiB pieces)", None
    )
    eval_only: bool = option("evaluate on it but never train it", False)


@dataclass
class DataConfig:
    seq_len: int = option("tokens per packed training sequence", 256)
    eval_sequences: int = option("held-out sequences per domain for perplexity", 64)
    cache_dir: str | None = option("tokenised-data cache; default OUTPUT_DIR/../.cltk-cache", None)


@dataclass
class TrainConfig:
    micro_batch_size: int = option("sequences per rank per forward pass", 4)
    gradient_accumulation_steps: int = option("micro-batches per optimizer step", 1)
    train_batch_size: int | None = option(
        "global batch; must equal micro_batch_size x gradient_accumulation_steps x world size", None
    )
    epochs: float = option("passes over each stage's data (fractions allowed)", 1.0)
    max_steps_per_stage: int | None = option("cap on optimizer steps per stage", None)
    lr: float = option("peak learning rate", 3e-4)
    min_lr_ratio: float = option("final LR as a share of the peak", 0.1)
    warmup_steps: int = option("linear warmup steps at the start of each LR span", 10)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = option(
        "after warmup: cosine / linear decay, constant, or wsd (stable, then decay at the end)",
        "cosine",
    )
    lr_span: Literal["stage", "run"] = option(
        "stage: re-warm and re-decay every stage; run: one schedule over the whole run (no re-warm)",
        "stage",
    )
    decay_share: float = option("wsd: the last share of the span that decays", 0.1)
    decay_shape: Literal["linear", "cosine", "1-sqrt"] = option("wsd: shape of the decay", "linear")
    joint: bool = option(
        "joint training, the bound continual methods are measured against: one stage mixing every "
        "trained domain, each in proportion to the steps its own stage would take, as many steps in all",
        False,
    )
    weight_decay: float = option("decoupled weight decay (AdamW)", 0.01)
    betas: list[float] = option("AdamW betas", factory=lambda: [0.9, 0.95])
    grad_clip: float = option("gradient clipping norm (0 = off)", 1.0)
    checkpoint_every: int = option(
        "also checkpoint every N steps inside a stage (0 = stage ends only)", 0
    )
    keep_checkpoints: int = option(
        "newest full checkpoints kept, stage-end and mid-stage alike (stage exports are always kept)",
        2,
    )
    log_every: int = option("log a line every N steps", 10)
    log_sequence_ids: bool = option(
        "write the ids of every trained sequence per rank (audit)", False
    )


@dataclass
class EvalConfig:
    batch_size: int = option("sequences per rank per eval forward", 8)
    heatmap: bool = option("draw forgetting.png", True)
    start: bool = option(
        "evaluate the starting model on every domain first: row 0 of the forgetting matrix", True
    )


@dataclass
class RunConfig:
    name: str = option("run name", "run")
    output_dir: str = option("where checkpoints, exports and metrics go", "runs/run")
    seed: int = option("seed of data order, init and dropout", 1234)
    deepspeed: str = option("DeepSpeed JSON (ZeRO and precision), e.g. ds_configs/zero2.json", "")
    model: ModelConfig = option("the model", factory=ModelConfig)
    tokenizer: TokenizerConfig = option("the tokenizer", factory=TokenizerConfig)
    domains: list[DomainConfig] = option("domains in training order", factory=list)
    data: DataConfig = option("packing and held-out split", factory=DataConfig)
    train: TrainConfig = option("optimisation", factory=TrainConfig)
    eval: EvalConfig = option("evaluation", factory=EvalConfig)
    sections: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "the config section of every method turned on, by name (cltk.registry)"},
    )
    base_dir: str = field(
        default=".", metadata={"help": "directory relative paths resolve against"}
    )

    # ----- derived values -------------------------------------------------------------------------
    def resolve(self, path: str | None) -> Path | None:
        """A config path, relative to the config file's directory (or absolute)."""
        if path is None:
            return None
        p = Path(os.path.expandvars(os.path.expanduser(path)))
        return p if p.is_absolute() else (Path(self.base_dir) / p)

    @property
    def out(self) -> Path:
        return self.resolve(self.output_dir)  # type: ignore[return-value]

    @property
    def cache_dir(self) -> Path:
        if self.data.cache_dir:
            return self.resolve(self.data.cache_dir)  # type: ignore[return-value]
        return self.out.parent / ".cltk-cache"

    def train_domains(self) -> list[DomainConfig]:
        return [d for d in self.domains if not d.eval_only]

    def global_batch(self, world_size: int) -> int:
        return self.train.micro_batch_size * self.train.gradient_accumulation_steps * world_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("base_dir")
        d.update(d.pop("sections"))  # each method's section at the top level, as in the YAML
        return d

    # a method's section reads as an attribute: cfg.das is the das section, or None when it is off
    def __getattr__(self, name: str) -> Any:
        if name != "sections" and registry.get(name) is not None:
            return self.sections.get(name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        if registry.get(name) is not None:
            if value is None:
                self.sections.pop(name, None)
            else:
                self.sections[name] = value
            return
        object.__setattr__(self, name, value)


# ----- loading ---------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check and convert ``value`` to the annotated type ``tp``; errors name ``key``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if type(None) in typing.get_args(tp):
                return None
            raise ConfigError(key, "must not be empty")
        errors = []
        for a in args:
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(e)
        if errors:
            raise errors[0]  # it names its own key (a nested section's names the inner key)
        raise ConfigError(key, "bad value")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping of {_type_name(tp)} fields, got {value!r}")
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(key, f"must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(key, f"must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            if isinstance(value, str):  # YAML reads 3e-4 as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            if not isinstance(value, float):
                raise ConfigError(key, f"must be a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every `> 0` check; inf overflows step counts
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(key, f"must be a string, got {value!r}")
        return value
    return value


def _build(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.name not in ("base_dir", "sections")]
    kwargs: dict[str, Any] = {}
    if cls is RunConfig:  # the methods' sections come from the registry
        sections = {}
        for k in list(raw):
            spec = registry.get(str(k))
            if spec is not None and raw[k] is not None:
                sections[k] = _convert(raw.pop(k), spec.config, str(k))
            elif spec is not None:
                raw.pop(k)
        kwargs["sections"] = sections
        names = names + [s.name for s in registry.specs()]
    for k, v in raw.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"known keys: {', '.join(names)}"
            raise ConfigError(key, f"unknown key; {hint}")
        kwargs[k] = _convert(v, hints[k], key)
    return cls(**kwargs)


def _set_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply ``a.b.c=value`` (value parsed as YAML) to the raw mapping."""
    if "=" not in assignment:
        raise ConfigError(assignment, "an override must look like key.sub=value")
    key, value = assignment.split("=", 1)
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(key, f"'{part}' is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(key, f"the value {value!r} given with --set is not valid YAML") from e


def _yaml_error(path: Path, e: yaml.YAMLError) -> str:
    """``FILE:LINE:COL: not valid YAML (the problem)``, on one line."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = " ".join(str(x) for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
    return f"{where}: not valid YAML ({what or e}); fix the file there"


def read_raw(path: str | os.PathLike, overrides: list[str] | None = None) -> tuple[dict, Path]:
    """The mapping a YAML config file holds, with ``key.sub=value`` overrides applied, and the file's
    directory (relative paths resolve against it). Shared by every cltk config loader."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file {p} not found")
    try:
        raw = yaml.safe_load(p.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as e:
        raise ConfigError("", f"{p} is not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    except yaml.YAMLError as e:
        raise ConfigError("", _yaml_error(p, e)) from e
    if not isinstance(raw, dict):
        raise ConfigError("", f"{p} must hold a mapping of sections, got {type(raw).__name__}")
    for o in overrides or []:
        _set_override(raw, o)
    return raw, p.resolve().parent


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
    raw = json.loads(json.dumps(raw))  # deep copy; overrides must not touch the caller's mapping
    for o in overrides or []:
        _set_override(raw, o)
    cfg = _build(RunConfig, raw)
    cfg.base_dir = str(base)
    from cltk.validate import validate

    validate(cfg, world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1")))
    return cfg


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows of every config key, for docs/config.md."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in ("base_dir", "sections"):
            continue
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            sub = tp if dataclasses.is_dataclass(tp) else inner[0]
            rows.append(
                (key, "section" + (" (optional)" if inner else ""), "", f.metadata.get("help", ""))
            )
            rows.extend(describe(sub, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = ""
        tname = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
        tname = tname.replace("NoneType", "None")
        rows.append((key, tname, default, f.metadata.get("help", "")))
    if cls is RunConfig:
        for spec in registry.specs():
            rows.append((prefix + spec.name, "section (optional)", "", spec.help))
            rows.extend(describe(spec.config, f"{prefix}{spec.name}."))
    return rows
