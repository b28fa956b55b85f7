"""The continual NER loop: for each step, grow the tagger, train it beside its frozen teacher
through DeepSpeed, save it, and evaluate every type on the held-out set (one row of the F1 matrix).

    cltk ner --config examples/ner/brown.yaml                         # one process
    deepspeed --num_gpus 2 --module cltk ner --config examples/ner/brown.yaml

Every input is read and checked before the first step trains. All ranks evaluate the whole
held-out set (it is small; under ZeRO 3 every rank must run the same forwards anyway).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import deepspeed
import torch

from cltk import distributed as dist
from cltk.ds_config import deepspeed_config, frozen_deepspeed_config
from cltk.engine import build_engine, frozen_engine
from cltk.errors import ConfigError
from cltk.ner.config import NerConfig
from cltk.ner.data import Encoded, collate, encode, head_labels, load_run_data
from cltk.ner.losses import addner_loss, extendner_loss
from cltk.ner.metrics import F1Report, f1_report, format_table, prf, save_report
from cltk.ner.model import NerTagger, build_backbone, grow, layer_types, predict_words
from cltk.schedules import lr_multiplier


def build_ner_engine(cfg: NerConfig, model: torch.nn.Module):
    """The student's engine (:func:`cltk.engine.build_engine`): AdamW, a linear warmup of
    ``train.warmup_steps`` then a constant LR (:func:`cltk.schedules.lr_multiplier`)."""
    t = cfg.train
    return build_engine(cfg, model, t.steps,
                        lr_fn=lambda s: lr_multiplier(s, t.steps, t.warmup_steps, "constant", 1.0))


def full_state(engine) -> dict[str, torch.Tensor]:
    """The whole model's weights on every rank (gathered under ZeRO 3; collective)."""
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().float().cpu().clone() for k, v in engine.module.state_dict().items()}


def _tokenizer(cfg: NerConfig, train_sets: list[list]) -> Any:
    from cltk.data.tokenizer import load_tokenizer, train_tokenizer

    tok = cfg.tokenizer
    if tok.path or (cfg.model.init_from and not tok.vocab_size):
        return load_tokenizer(cfg.resolve(tok.path or cfg.model.init_from))  # type: ignore[arg-type]
    out = cfg.out / "tokenizer"
    if dist.is_main():
        texts = [" ".join(w) for sents in train_sets for w, _ in sents]
        train_tokenizer(texts, int(tok.vocab_size), out, seed=cfg.seed)  # type: ignore[arg-type]
    dist.barrier()
    return load_tokenizer(out)


def _encode_all(tokenizer, sents, labels: list[str], max_len: int) -> list[Encoded]:
    index = {lab: i for i, lab in enumerate(labels)}
    return [encode(tokenizer, w, [index[t] for t in tags], max_len) for w, tags in sents]


def _batches(items: list[Encoded], size: int, seed: int):
    """Endless micro-batches of this rank's sentences, reshuffled (seeded) every pass."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        for i in range(0, len(order) - size + 1, size):
            yield [items[j] for j in order[i : i + size]]


def _loss(cfg: NerConfig, logits, t_logits, labels):
    flat = [x.reshape(-1, x.shape[-1]) for x in logits]
    t_flat = None if t_logits is None else [x.reshape(-1, x.shape[-1]) for x in t_logits]
    d = cfg.distill
    a, b, temp = (d.alpha, d.beta, d.temperature) if d is not None else (0.0, 1.0, 1.0)
    if cfg.variant == "extendner":
        return extendner_loss(flat[0], None if t_flat is None else t_flat[0], labels, a, b, temp)
    return addner_loss(flat, t_flat, labels, a, b, temp)


@torch.no_grad()
def evaluate(engine, variant, tokenizer, sents, layers, max_len, batch) -> list[list[str]]:
    """Predicted word tags of every sentence (the same forwards on every rank)."""
    engine.eval()
    enc = [encode(tokenizer, w, [0] * len(w), max_len) for w, _ in sents]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    preds: list[list[str]] = []
    for i in range(0, len(enc), batch):
        chunk = enc[i : i + batch]
        b = collate(chunk, pad)
        logits = engine(input_ids=b["input_ids"].to(engine.device),
                        attention_mask=b["attention_mask"].to(engine.device))
        for r, e in enumerate(chunk):
            preds.append(predict_words(variant, [lg[r].cpu() for lg in logits], e.first, layers))
    engine.train()
    return preds


def _log(path: Path, row: dict) -> None:
    if dist.is_main():
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def _train_step(cfg: NerConfig, k: int, engine, teacher, batches, pad: int) -> None:
    """The optimizer updates of continual step ``k`` (``train.steps`` of them)."""
    t, step = cfg.train, cfg.steps[k]
    for opt_step in range(t.steps):
        sums: dict[str, float] = {}
        for _ in range(t.gradient_accumulation_steps):
            b = {key: v.to(engine.device) for key, v in collate(next(batches), pad).items()}
            logits = engine(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            t_logits = None
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(input_ids=b["input_ids"],
                                       attention_mask=b["attention_mask"])
            loss, metrics = _loss(cfg, logits, t_logits, b["labels"].reshape(-1))
            # every rank stops together, before the update (a lone raise would hang the others)
            if not torch.isfinite(dist.all_reduce_sum(loss.detach().float().cpu().clone())):
                raise RuntimeError(f"non-finite loss at step {step.name}, update {opt_step}: "
                                   "stopped before the update; lower train.lr or check the data")
            engine.backward(loss)
            engine.step()
            for name, v in {"loss": loss.detach(), **metrics}.items():
                sums[name] = sums.get(name, 0.0) + float(v) / t.gradient_accumulation_steps
        if opt_step % t.log_every == 0 or opt_step == t.steps - 1:
            _log(cfg.out / "train_log.jsonl", {"step": k, "step_name": step.name,
                                               "update": opt_step, **sums})


def run_ner(cfg: NerConfig) -> F1Report:
    """Run every step of ``cfg``; returns the F1 report (also saved in ``cfg.out``)."""
    from transformers import AutoModel

    out = cfg.out
    if (out / "steps").exists():
        raise ConfigError("output_dir", f"{out} already holds a run; choose another output_dir")
    train_sets, eval_set = load_run_data(cfg, dist.world_size())
    dist.init()
    dist.barrier()  # every rank has read and checked every input before any rank writes
    if dist.is_main():
        out.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    tokenizer = _tokenizer(cfg, train_sets)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    teacher_ds = frozen_deepspeed_config(
        deepspeed_config(cfg, dist.world_size(), dist.bf16_available())
    )
    t, rank, world = cfg.train, dist.rank(), dist.world_size()
    state: dict[str, torch.Tensor] | None = None
    backbone_config = None
    rows: list[list[float]] = []
    details: list[dict] = []
    report = None
    for k, step in enumerate(cfg.steps):
        steps_types = [s.types for s in cfg.steps[: k + 1]]
        layers = layer_types(cfg.variant, steps_types)
        sizes = [len(head_labels(types)) for types in layers]
        torch.manual_seed(cfg.seed * 1000 + k)  # new layers start alike on every rank
        if backbone_config is None:
            backbone = build_backbone(cfg.model.config, cfg.resolve(cfg.model.init_from),
                                      len(tokenizer))
            backbone_config = backbone.config
        else:
            backbone = AutoModel.from_config(backbone_config)
        model = NerTagger(backbone, sizes)
        teacher = None
        if state is not None:
            old_layers = layer_types(cfg.variant, steps_types[:-1])
            old_sizes = [len(head_labels(types)) for types in old_layers]
            grow(state, cfg.variant, old_sizes, sizes, model)
            if cfg.distill is not None:
                tmodel = NerTagger(AutoModel.from_config(backbone_config), old_sizes)
                tmodel.load_state_dict(state)
                teacher = frozen_engine(tmodel, teacher_ds)
        engine = build_ner_engine(cfg, model)
        # the step's labels in the columns of the layer that learns them
        labels = head_labels(layers[-1])
        items = _encode_all(tokenizer, train_sets[k][rank::world], labels, t.max_len)
        batches = _batches(items, t.micro_batch_size, cfg.seed * 1000 + k * 10 + rank)
        _train_step(cfg, k, engine, teacher, batches, pad)
        state = full_state(engine)
        step_dir = out / "steps" / f"{k}-{step.name}"
        if dist.is_main():
            step_dir.mkdir(parents=True, exist_ok=True)
            torch.save(state, step_dir / "tagger.pt")
            (step_dir / "tagger.json").write_text(json.dumps({
                "variant": cfg.variant, "layers": layers, "labels": [head_labels(x) for x in layers],
                "backbone_config": backbone_config.to_dict()}, indent=2) + "\n")
        preds = evaluate(engine, cfg.variant, tokenizer, eval_set, layers, t.max_len,
                         4 * t.micro_batch_size)
        scores = prf([g for _, g in eval_set], preds, cfg.all_types())
        rows.append([scores[ty]["f1"] for ty in cfg.all_types()])
        details.append({"step": step.name, "scores": scores})
        report = f1_report(rows, [s.name for s in cfg.steps], [s.types for s in cfg.steps])
        if dist.is_main():
            save_report(report, out, details)
            print(f"cltk ner: after step {k} ({step.name}):\n{format_table(report)}", flush=True)
        engine.destroy()
        if teacher is not None:
            teacher.destroy()
        dist.barrier()
    assert report is not None
    return report
