"""Row 0 of the forgetting matrix: the starting model, evaluated on every domain before the first stage.

The starting model is what the first stage starts from: ``model.init_from``, ``model.gguf``, or the inline
config initialised from the run's seed (the same weights, since :func:`cltk.models.build_model` seeds the
initialisation). Under LoRA it is the base model. It is scored on the same held-out sequences as every
stage, through a DeepSpeed engine without optimizer, in the run's precision: ZeRO 3 keeps it partitioned
(as the frozen teacher of :mod:`cltk.methods.kit.teacher`), other stages use a plain copy per rank.

The row is measured once and kept in ``OUT/start.json`` (written atomically by rank 0); a resumed run
reads it, and a run that grows (new domains appended) scores only the domains it lacks.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import torch

from cltk import checkpoint
from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.ds_config import deepspeed_config, frozen_deepspeed_config
from cltk.engine import frozen_engine
from cltk.forward import engine_forward
from cltk.perplexity import evaluate_domains
from cltk.tracking import log

START_FILE = "start.json"


def evaluate_frozen(cfg: RunConfig, model: torch.nn.Module, domains: list[Any]) -> dict[str, float]:
    """Perplexity of ``model`` on each packed domain (collective: every rank calls it alike).

    The model is wrapped by ``deepspeed.initialize`` without optimizer
    (:func:`~cltk.ds_config.frozen_deepspeed_config`), scored, and released; every rank returns the
    same figures.
    """
    ds = frozen_deepspeed_config(deepspeed_config(cfg, dist.world_size(), dist.bf16_available()))
    engine = frozen_engine(model, ds)
    try:
        return evaluate_domains(
            engine_forward(engine), domains, cfg.eval.batch_size, engine.device, engine.module
        )
    finally:
        engine.destroy()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # before the stage's own engine allocates


def model_identity(cfg: RunConfig) -> dict[str, Any]:
    """What the starting model is, as recorded in ``start.json`` (a changed one is measured anew)."""
    m = cfg.model
    source = m.source()
    ident: dict[str, Any] = {"source": source, "dtype": m.dtype}
    if source == "config":
        ident.update(config=m.config, seed=cfg.seed)
    else:
        ident["path"] = str(cfg.resolve(m.init_from or m.gguf).resolve())  # type: ignore[union-attr]
    return ident


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def start_row(
    cfg: RunConfig, tokenizer: Any, domains: dict[str, Any], names: list[str]
) -> dict[str, float]:
    """Row 0 (domain -> perplexity, in ``names`` order), measured once per run (collective).

    Reads ``OUT/start.json``; scores only the domains it lacks (all of them on a fresh run, none on a
    resume, the new ones when a run grows) and writes the record back atomically.
    """
    from cltk.models import build_model

    path = cfg.out / START_FILE
    ident = model_identity(cfg)
    record = dist.broadcast_object(_read(path) if dist.is_main() else None)
    if record is not None and record.get("model") != ident:
        log(
            f"start: {path} was measured on another starting model ({record.get('model')}); "
            "measuring it again"
        )
        record = None
    record = record or {"model": ident, "perplexity": {}}
    missing = [n for n in names if n not in record["perplexity"]]
    if not missing:
        log(f"start: row 0 read from {path} (measured once, not again)")
    else:
        log(f"start: evaluating the starting model ({ident['source']}) on {', '.join(missing)}")
        model = build_model(cfg, tokenizer)
        ppl = evaluate_frozen(cfg, model, [domains[n] for n in missing])
        del model
        record["perplexity"].update(ppl)
        record["world_size"] = dist.world_size()
        if dist.is_main():
            cfg.out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(path, json.dumps(record, indent=1))
        dist.barrier()
        log("start: perplexity " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    return {n: record["perplexity"][n] for n in names}
