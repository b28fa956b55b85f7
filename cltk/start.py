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
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cltk import checkpoint
from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.ds_config import deepspeed_config, frozen_deepspeed_config
from cltk.engine import frozen_engine, release_engine
from cltk.forward import engine_forward
from cltk.perplexity import evaluate_domains
from cltk.tracking import log

START_FILE = "start.json"


def evaluate_frozen(
    cfg: RunConfig, model: torch.nn.Module, domains: list[Any],
    after: Callable[[Any], None] | None = None,
) -> dict[str, float]:
    """Perplexity of ``model`` on each packed domain (collective: every rank calls it alike).

    The model is wrapped by ``deepspeed.initialize`` without optimizer
    (:func:`~cltk.ds_config.frozen_deepspeed_config`), scored, handed to ``after(engine)`` when given
    (downstream tasks), and released; every rank returns the same figures.
    """
    ds = frozen_deepspeed_config(deepspeed_config(cfg, dist.world_size(), dist.bf16_available()))
    engine = frozen_engine(model, ds)
    try:
        ppl = evaluate_domains(
            engine_forward(engine), domains, cfg.eval.batch_size, engine.device, engine.module
        )
        if after is not None:
            after(engine)
        return ppl
    finally:
        release_engine(engine)  # before the stage's own engine allocates
        del engine
        gc.collect()


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


def eval_fingerprint(domain: Any) -> str:
    """SHA-256 (16 hex) of a packed domain's held-out token ids: what its row-0 figure was measured on
    (a few thousand tokens: cheap)."""
    ev = domain.eval.with_format("numpy")
    h = hashlib.sha256(len(ev).to_bytes(8, "little"))
    if len(ev):
        h.update(np.ascontiguousarray(np.asarray(ev[0 : len(ev)]["input_ids"], dtype="<i8")).tobytes())
    return h.hexdigest()[:16]


def start_key(cfg: RunConfig, tokenizer: Any) -> dict[str, Any]:
    """Everything row 0 depends on besides each domain's held-out data: the starting model, the
    tokenizer, the packing settings and the precision (a change to any is measured anew)."""
    from cltk.data.tokenizer import tokenizer_fingerprint

    ds = deepspeed_config(cfg, dist.world_size(), dist.bf16_available())
    return {
        "model": model_identity(cfg),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "seq_len": cfg.data.seq_len,
        "eval_sequences": cfg.data.eval_sequences,
        "precision": {k: (ds.get(k) or {}).get("enabled", False) for k in ("bf16", "fp16")},
    }


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def start_row(
    cfg: RunConfig, tokenizer: Any, domains: dict[str, Any], names: list[str]
) -> dict[str, float]:
    """Row 0 (domain -> perplexity, in ``names`` order), measured once per run (collective).

    Reads ``OUT/start.json``; scores only the domains it lacks (all of them on a fresh run, none on a
    resume, the new ones when a run grows) and writes the record back atomically.
    """
    return start_record(cfg, tokenizer, domains, names)["perplexity_row"]


def start_record(
    cfg: RunConfig, tokenizer: Any, domains: dict[str, Any], names: list[str]
) -> dict[str, Any]:
    """``OUT/start.json`` brought up to date (see :func:`start_row`), with ``perplexity_row`` (domain
    -> perplexity in ``names`` order) and ``tasks`` (the downstream tasks' scores, eval.tasks)."""
    from cltk.models import build_model
    from cltk.tasks import TaskScorer

    path = cfg.out / START_FILE
    key = start_key(cfg, tokenizer)
    ident = key["model"]
    data = {n: eval_fingerprint(domains[n]) for n in names}
    record = dist.broadcast_object(_read(path) if dist.is_main() else None)
    if record is not None:
        old = {k: record.get(k) for k in key} if "key" not in record else record["key"]
        changed = [k for k in key if old.get(k) != key[k]]
        if changed:
            log(f"start: {path} was measured with another {', '.join(changed)}; measuring it again")
            record = None
    record = record or {"key": key, "model": ident, "data": {}, "perplexity": {}}
    stale = [n for n in names if n in record["perplexity"] and record.get("data", {}).get(n) != data[n]]
    if stale:
        log(f"start: the held-out data of {', '.join(stale)} changed since row 0 was measured; "
            "measuring them again")
    missing = [n for n in names if n not in record["perplexity"] or n in stale]
    scorer = TaskScorer(cfg, tokenizer, record)
    if not missing and not scorer.missing:
        log(f"start: row 0 read from {path} (measured once, not again)")
    else:
        log(f"start: evaluating the starting model ({ident['source']}) on "
            f"{', '.join(missing + scorer.missing)}")
        model = build_model(cfg, tokenizer)
        ppl = evaluate_frozen(cfg, model, [domains[n] for n in missing], after=scorer)
        del model
        record["perplexity"].update(ppl)
        record["data"] = {**record.get("data", {}), **{n: data[n] for n in missing}}
        record["world_size"] = dist.world_size()
        if dist.is_main():
            cfg.out.mkdir(parents=True, exist_ok=True)
            checkpoint.write_atomic(path, json.dumps(record, indent=1))
        dist.barrier()
        if ppl:
            log("start: perplexity " + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items()))
    return {**record, "perplexity_row": {n: record["perplexity"][n] for n in names}}
