"""The run config's schema: typed sections, each key with a line of help, parsed from a YAML mapping.

The schema only parses (types, unknown keys, did-you-mean, through :mod:`cltk.typed_config`); each
method's section loads through the registry. The checks of a config as a whole sit above it, in
:mod:`cltk.validate`, whose :func:`~cltk.validate.load_config` reads, parses and checks a run config;
the DeepSpeed config handed to ``deepspeed.initialize`` is :mod:`cltk.ds_config`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cltk import registry, typed_config
from cltk.errors import ConfigError
from cltk.typed_config import option

__all__ = ["ConfigError", "RunConfig", "option", "parse_config", "describe"]


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
class SourceConfig:
    """A named text source: what a domain and a method's extra corpus (replay's general data) share."""

    name: str = option("its name (unique; letters, digits, - and _; used in file names and reports)", "")
    source: dict[str, Any] = option(
        "one of {builtin: NAME}, {files: GLOB}, {jsonl: PATH, field: text}, {hf_dataset: DIR, field}, "
        "or a mixture {mix: [{files: A, weight: 0.7}, {jsonl: B, weight: 0.3}]}",
        factory=dict,
    )
    max_chars: int | None = option(
        "read at most this many characters (a seeded sample of the source's files or 1 MiB pieces)", None
    )


@dataclass
class DomainConfig(SourceConfig):
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


# ----- parsing ---------------------------------------------------------------------------------------


def parse_config(
    raw: dict[str, Any], base_dir: str | os.PathLike = ".", overrides: list[str] | None = None
) -> RunConfig:
    """A :class:`RunConfig` from a mapping (types converted, unknown keys refused), not yet checked
    as a whole (:func:`cltk.validate.load_config` does both).

    Args:
        raw: the YAML's mapping; not modified (a deep copy takes the overrides).
        base_dir: the directory relative paths resolve against.
        overrides: ``key.sub=value`` assignments applied on top (``--set`` on the command line).
    """
    raw = json.loads(json.dumps(raw))  # deep copy; overrides must not touch the caller's mapping
    for o in overrides or []:
        typed_config.set_override(raw, o)
    sections = {s.name: s.config for s in registry.specs()}
    cfg = typed_config.build(RunConfig, raw, sections=sections)
    cfg.base_dir = str(base_dir)
    return cfg


def describe() -> list[tuple[str, str, str, str]]:
    """(key, type, default, help) rows of every run-config key, each method's section included, for
    docs/config.md."""
    return typed_config.describe(
        RunConfig, sections=[(s.name, s.help, s.config) for s in registry.specs()]
    )
