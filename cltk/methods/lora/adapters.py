"""LoRA adapters per domain (or per block) through PEFT, as a :class:`~cltk.method.Method`.

Each stage trains one LoRA adapter in its own DeepSpeed engine: the trainable set is fixed at
``deepspeed.initialize``, so the loop's one engine per stage is exactly one engine per adapter.
An adapter is named by its *key*: the domain (``lora.per: domain``; the blocks of a domain continue
the same adapter) or the stage (``lora.per: block``).

``lora.base`` decides what the adapters sit on:

- ``frozen``: every adapter sits on the configured model, which never changes. ``init_dir`` returns
  None, so each stage rebuilds it (an inline config is rebuilt identically from the seed; an
  ``init_from`` or GGUF model is reloaded). A model without a plain directory of its own (inline
  config, GGUF) is saved once to ``OUT/lora_base`` so PEFT can load the adapters on it.
- ``merged``: each stage's adapter is merged into the weights the next key starts from.

Files of a run::

    OUT/stages/<i>-<name>/            plain save_pretrained model: the stage's base with its adapter
                                      merged in (what ``cltk eval`` and soft-target teachers load)
    OUT/stages/<i>-<name>/adapter/    the adapter as trained in that stage (PEFT directory)
    OUT/adapters/<key>/               the latest adapter of each key (PEFT directory); its
                                      ``adapter_config.json`` names the base it belongs on
    OUT/lora_base/                    the frozen base, when the configured model has no directory

Under ZeRO 3 the adapter weights are gathered (``zero.GatheredParameters``) before they are saved
or merged; without that the files would hold empty tensors. Evaluation (three views for ``frozen``)
lives in :mod:`cltk.methods.lora.routing`.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import statistics
from pathlib import Path
from typing import Any

import torch

from cltk import distributed as dist
from cltk import registry
from cltk.config import ConfigError, RunConfig
from cltk.method import Method, StageContext
from cltk.tracking import log

TRAIN_ADAPTER = "default"  # PEFT's in-memory name of the adapter a stage trains
BASE_DIRNAME = "lora_base"
ADAPTERS_DIRNAME = "adapters"
META_FILE = "cltk_adapter.json"
EVAL_FILE = "lora_eval.json"
REPORT_FILE = "lora_report.json"
_PEFT_PREFIX = "base_model.model."
StateDict = dict[str, torch.Tensor]


# ----- config -------------------------------------------------------------------------------------


def check_lora_config(cfg: RunConfig) -> None:
    """Refuse LoRA settings and combinations that cannot work; raises :class:`ConfigError`.

    ``LoraMethod`` calls it, and its section check (:mod:`cltk.validate`), before any launch. The
    methods it refuses beside a frozen base are named by their specs, never here.
    """
    lc = cfg.lora
    if lc is None:
        return
    if lc.r < 1:
        raise ConfigError("lora.r", f"must be a positive integer, got {lc.r}")
    if lc.alpha <= 0:
        raise ConfigError("lora.alpha", f"must be > 0, got {lc.alpha}")
    if not 0 <= lc.dropout < 1:
        raise ConfigError("lora.dropout", f"must be in [0, 1), got {lc.dropout}")
    if lc.target_modules is not None and not lc.target_modules:
        raise ConfigError("lora.target_modules", "is empty; list module names (e.g. [q_proj, "
                          "v_proj]) or leave it out for the attention projections")
    if lc.base != "frozen":
        return
    if lc.per == "block" and registry.stages_per_domain(cfg) > 1:
        raise ConfigError("lora.per", "per: block with base: frozen gives every block its own "
                          "adapter on the original base, trained on 1/k of its domain and never "
                          "combined with the domain's other blocks; use per: domain (a domain's "
                          "blocks continue one adapter) or base: merged")
    for spec, section in registry.active(cfg):
        key = spec.previous_domain_teacher(section)
        if key:
            raise ConfigError(key, "with lora.base: frozen each domain's adapter starts fresh on "
                              "the original base and never overwrites an earlier domain's, so a "
                              "teacher from the previous domain's model is the wrong one: it "
                              f"protects nothing and only slows learning; turn {key} off or use "
                              "lora.base: merged")


def adapter_key(cfg: RunConfig, stage: Any) -> str:
    """The adapter a stage trains: its domain, or the stage's own name (``per: block``)."""
    assert cfg.lora is not None
    return stage.name if cfg.lora.per == "block" else stage.domain


def key_stages(cfg: RunConfig, stages: list, upto: int) -> dict[str, list[int]]:
    """Key -> indices of the stages up to ``upto`` (included) that trained it; keys in order."""
    out: dict[str, list[int]] = {}
    for s in stages[: upto + 1]:
        out.setdefault(adapter_key(cfg, s), []).append(s.index)
    return out


def stage_dir(out: Path, stage: Any) -> Path:
    return Path(out) / "stages" / stage.dirname


def configured_base_dir(cfg: RunConfig) -> Path:
    """The plain model directory of the configured model (``init_from``, else ``OUT/lora_base``)."""
    if cfg.model.init_from:
        return cfg.resolve(cfg.model.init_from).resolve()  # type: ignore[union-attr]
    return (cfg.out / BASE_DIRNAME).resolve()


def key_base_dir(cfg: RunConfig, stages: list, stage: Any) -> Path:
    """The model a stage's adapter sits on: the configured model (``frozen``), or for ``merged`` the
    export of the stage before its key's first stage."""
    assert cfg.lora is not None
    first = key_stages(cfg, stages, stage.index)[adapter_key(cfg, stage)][0]
    if cfg.lora.base == "frozen" or first == 0:
        return configured_base_dir(cfg)
    return stage_dir(cfg.out, stages[first - 1]).resolve()


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Leaf names of the linear layers inside attention blocks (``q_proj``..., ``c_attn``...)."""
    from transformers.pytorch_utils import Conv1D

    names: set[str] = set()
    for mod in model.modules():
        if "attention" not in type(mod).__name__.lower():
            continue
        for n, child in mod.named_modules():
            if n and isinstance(child, (torch.nn.Linear, Conv1D)):
                names.add(n.rsplit(".", 1)[-1])
    if not names:
        raise ConfigError("lora.target_modules", f"found no attention projections in "
                          f"{type(model).__name__}; list the module names to adapt")
    return sorted(names)


def peft_config(cfg: RunConfig, model: torch.nn.Module):
    """The ``peft.LoraConfig`` of the run's ``lora`` section for ``model``."""
    import peft
    from transformers.pytorch_utils import Conv1D

    lc = cfg.lora
    assert lc is not None
    targets = lc.target_modules or default_target_modules(model)
    leaves = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
              if isinstance(m, (torch.nn.Linear, torch.nn.Embedding, Conv1D))}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise ConfigError("lora.target_modules", f"{missing} match no linear or embedding layer "
                          f"of {type(model).__name__}; its layers are named {sorted(leaves)}")
    fan_in_fan_out = any(isinstance(m, Conv1D) for n, m in model.named_modules()
                         if n.rsplit(".", 1)[-1] in targets)
    return peft.LoraConfig(r=lc.r, lora_alpha=lc.alpha, lora_dropout=lc.dropout,
                           target_modules=list(targets), fan_in_fan_out=fan_in_fan_out,
                           task_type="CAUSAL_LM")


# ----- gather, merge, save ------------------------------------------------------------------------


def export_state_dicts(engine) -> tuple[StateDict | None, StateDict | None]:
    """(merged, adapter) state dicts of a PEFT engine on rank 0, None elsewhere (collective).

    ``merged`` is a plain model's state dict: every adapted weight ``W + scaling * B @ A`` (added in
    fp32, cast back), the LoRA tensors dropped and PEFT's prefixes removed. ``adapter`` holds the
    trainable LoRA tensors under their PEFT names. Under ZeRO 3 the full weights are consolidated
    and the adapter gathered (``zero.GatheredParameters``, a no-op for ZeRO 1/2 parameters).
    """
    import deepspeed
    from peft.tuners.lora import LoraLayer

    module = engine.module
    if engine.zero_optimization_stage() == 3:
        full = engine._zero3_consolidated_16bit_state_dict()
    else:
        full = dict(module.state_dict()) if dist.is_main() else None
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the LoRA model has no trainable parameters: was prepare_model skipped?")
    merged = adapter = None
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        if dist.is_main():
            assert full is not None
            adapter = {n: p.detach().to("cpu", copy=True) for n, p in named}
            for name, layer in module.named_modules():
                if isinstance(layer, LoraLayer) and TRAIN_ADAPTER in layer.scaling:
                    key = f"{name}.base_layer.weight"
                    w = full[key]
                    delta = layer.get_delta_weight(TRAIN_ADAPTER).detach().to("cpu", torch.float32)
                    full[key] = (w.float() + delta.reshape(w.shape)).to(w.dtype)  # never in place
            merged = {_plain_key(k): v for k, v in full.items() if ".lora_" not in k}
    return merged, adapter


def _plain_key(key: str) -> str:
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX):]
    return key.replace(".base_layer.", ".")


def save_adapter(model, state_dict: dict[str, torch.Tensor], out_dir: Path, meta: dict) -> int:
    """Write a PEFT adapter directory (rank 0) atomically; returns its weights file's bytes."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), state_dict=state_dict, selected_adapters=[TRAIN_ADAPTER],
                          save_embedding_layers=False)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return (out_dir / "adapter_model.safetensors").stat().st_size


def _median_step(metrics_csv: Path, stage_index: int) -> tuple[float | None, float | None]:
    """Median seconds and tokens/s of a stage's steps in ``metrics.csv`` (rank 0 writes it)."""
    if not metrics_csv.is_file():
        return None, None
    with open(metrics_csv) as f:
        rows = [r for r in csv.DictReader(f) if int(r["stage"]) == stage_index]
    if not rows:
        return None, None
    return (statistics.median(float(r["seconds"]) for r in rows),
            statistics.median(float(r["tokens_per_s"]) for r in rows))


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


# ----- the method ---------------------------------------------------------------------------------


class LoraMethod(Method):
    """A LoRA adapter per domain (or block) on a frozen or a stage-by-stage merged base.

    Args:
        cfg: the run config; its ``lora`` section must be set.
        route_prefix: tokens at the start of each held-out sequence the router may read
            (default ``data.seq_len // 4``); only the tokens after them are scored (routed view).
    """

    name = "lora"

    @classmethod
    def from_config(cls, cfg: RunConfig, section: Any) -> LoraMethod:
        return cls(cfg)  # the section is cfg.lora; the second argument is the router's prefix

    def __init__(self, cfg: RunConfig, route_prefix: int | None = None):
        if cfg.lora is None:
            raise ValueError("lora: LoraMethod needs the run config's lora section (lora: {r: 8})")
        check_lora_config(cfg)
        self.cfg, self.lcfg = cfg, cfg.lora
        self.route_prefix = route_prefix if route_prefix is not None else cfg.data.seq_len // 4
        if not 2 <= self.route_prefix <= cfg.data.seq_len - 1:
            raise ValueError(f"route_prefix must be in [2, data.seq_len - 1 = "
                             f"{cfg.data.seq_len - 1}] so the router reads a prefix and tokens are "
                             f"left to score; got {self.route_prefix}")
        self.stats: dict[str, Any] = {}

    # ----- hooks ----------------------------------------------------------------------------------
    def init_dir(self, ctx: StageContext, default: Path | None) -> Path | None:
        if self.lcfg.base == "frozen":
            return None
        key = adapter_key(self.cfg, ctx.stage)
        first = key_stages(self.cfg, ctx.stages, ctx.stage.index)[key][0]
        return stage_dir(self.cfg.out, ctx.stages[first - 1]) if first > 0 else None

    def prepare_model(self, ctx: StageContext, model: torch.nn.Module) -> torch.nn.Module:
        import peft

        from cltk.models import export_pretrained

        if ctx.stage.index == 0 and not self.cfg.model.init_from and dist.is_main():
            base = configured_base_dir(self.cfg)
            if not (base / "config.json").is_file():  # a resumed run keeps the first one
                export_pretrained(model, None, ctx.tokenizer, base)
        key = adapter_key(self.cfg, ctx.stage)
        earlier = key_stages(self.cfg, ctx.stages, ctx.stage.index)[key][:-1]
        base_dir = key_base_dir(self.cfg, ctx.stages, ctx.stage)
        if earlier:  # a later block of the domain continues the domain's adapter
            prev = stage_dir(self.cfg.out, ctx.stages[earlier[-1]]) / "adapter"
            model = peft.PeftModel.from_pretrained(model, str(prev), adapter_name=TRAIN_ADAPTER,
                                                   is_trainable=True)
            log(f"lora: stage {ctx.stage.dirname} continues adapter '{key}' from {prev}")
        else:
            model = peft.get_peft_model(model, peft_config(self.cfg, model),
                                        adapter_name=TRAIN_ADAPTER)
        model.peft_config[TRAIN_ADAPTER].base_model_name_or_path = str(base_dir)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        self.stats = {"key": key, "trainable_parameters": trainable, "total_parameters": total}
        targets = ", ".join(sorted(model.peft_config[TRAIN_ADAPTER].target_modules))
        log(f"lora: stage {ctx.stage.dirname} trains adapter '{key}' (r={self.lcfg.r}, "
            f"alpha={self.lcfg.alpha}, on {targets}): {trainable:,} of {total:,} parameters "
            f"trainable ({100 * trainable / total:.2f}%); base {base_dir}")
        return model

    def export(self, ctx: StageContext) -> bool:
        """The merged model into the stage directory; the adapter beside it and in OUT/adapters."""
        from cltk.models import export_pretrained

        merged, adapter = export_state_dicts(ctx.engine)
        if dist.is_main():
            assert merged is not None and adapter is not None
            module = ctx.engine.module
            export_pretrained(module.get_base_model(), merged, ctx.tokenizer, ctx.stage_dir)
            key = self.stats["key"]
            meta = {"key": key, "domain": ctx.stage.domain, "stage": ctx.stage.name,
                    "stages": [ctx.stages[i].name
                               for i in key_stages(self.cfg, ctx.stages, ctx.stage.index)[key]],
                    "base": self.lcfg.base,
                    "base_model": str(key_base_dir(self.cfg, ctx.stages, ctx.stage)),
                    "trainable_parameters": self.stats["trainable_parameters"]}
            nbytes = save_adapter(module, adapter, ctx.stage_dir / "adapter", meta)
            save_adapter(module, adapter, self.cfg.out / ADAPTERS_DIRNAME / key, meta)
            self.stats["adapter_bytes"] = nbytes
        return True

    def on_stage_end(self, ctx: StageContext) -> None:
        if not dist.is_main():
            return
        seconds, tok_s = _median_step(self.cfg.out / "metrics.csv", ctx.stage.index)
        self.stats.update(median_step_seconds=seconds, median_tokens_per_s=tok_s)
        s = self.stats
        step = f"median step {seconds:.3f} s ({tok_s:,.0f} tok/s)" if seconds else "no step timed"
        log(f"lora: stage {ctx.stage.dirname} adapter '{s['key']}': {s['trainable_parameters']:,} "
            f"trainable of {s['total_parameters']:,} parameters, {_size(s['adapter_bytes'])} on "
            f"disk, {step} (full training of the same model: benchmarks/lora.py)")

    def evaluate(self, ctx: StageContext, default: dict[str, float]) -> dict[str, float]:
        """``frozen``: the row with each domain's own adapter (the other views go to
        ``lora_eval.json``); ``merged``: the trained model's row as it is."""
        from cltk.methods.lora import routing

        record: dict[str, Any] = {"stage": ctx.stage.index, "name": ctx.stage.name,
                                  "base": self.lcfg.base, "latest_full": dict(default),
                                  "stats": dist.broadcast_object(self.stats)}
        row = default
        if self.lcfg.base == "frozen":
            keys = key_stages(self.cfg, ctx.stages, ctx.stage.index)
            adapters = [(k, stage_dir(self.cfg.out, ctx.stages[idx[-1]]) / "adapter")
                        for k, idx in keys.items()]
            views = routing.evaluate_frozen(
                self.cfg, configured_base_dir(self.cfg), adapters, ctx.domains,
                [d.name for d in self.cfg.domains], self.route_prefix)
            record.update(views)
            row = views["oracle_full"]
            log(f"lora: stage {ctx.stage.dirname} router accuracy "
                + (f"{views['router']['accuracy']:.3f}" if views["router"]["accuracy"] is not None
                   else "n/a") + " on the first "
                f"{self.route_prefix} tokens; routed perplexity "
                + ", ".join(f"{k} {v:.2f}" for k, v in views["routed"].items()))
        if dist.is_main():
            (ctx.stage_dir / EVAL_FILE).write_text(json.dumps(record, indent=1))
        return row

    def on_run_end(self, out_dir: Path, report: Any) -> None:
        from cltk.methods.lora import routing

        if dist.is_main():
            stages = Path(out_dir) / "stages"
            records = [json.loads((stages / f"{i:02d}-{n}" / EVAL_FILE).read_text())
                       for i, n in enumerate(report.stage_names[: report.completed_stages])]
            lora_report = routing.build_report(records, report, self.lcfg, self.route_prefix)
            (Path(out_dir) / REPORT_FILE).write_text(json.dumps(lora_report, indent=1))
            print(routing.format_report(lora_report), flush=True)
        dist.barrier()
