"""Evaluate the adapters of a frozen-base LoRA run three ways, and the router that picks one.

After each stage every held-out sequence of every domain is scored with:

- **oracle**: its domain's own adapter (the base model for a domain that has no adapter yet, or
  never will: evaluation-only domains);
- **routed**: the adapter cltk picks itself. The router reads the first ``prefix`` tokens of the
  sequence, scores them under every candidate (the base and each adapter) and takes the one with the
  lowest NLL on them (ties: the earlier candidate, the base first). It never sees the other tokens;
- **merged**: every adapter trained so far merged into one: the *mean* of their weight deltas,
  ``W + (1/K) sum_k scaling_k B_k A_k`` (exactly, through PEFT's ``cat`` combination with weights
  1/K: the merged adapter has rank K*r).

The routed view may only be scored on the tokens the router did not read, so all three views are
scored on the same tokens, positions ``prefix .. seq_len-1`` of every sequence (the *window*; the
model still reads the prefix as context, as a causal LM reads any earlier token). The oracle and
merged views are also kept on whole sequences, comparable with any cltk forgetting matrix; the
oracle one is the run's own matrix (``forgetting.json``).

Each rank loads one full copy of the base with every adapter (as ``cltk eval`` does), scores every
``world_size``-th sequence, and the sums are all-reduced: every rank returns the same figures.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cltk import distributed as dist
from cltk.metrics import compare_reports, forgetting_report

MEAN = "cltk_mean"
VIEWS = ("oracle", "routed", "merged")


def load_adapter_model(base_dir: Path, adapter_dirs: list[Path], dtype: torch.dtype = torch.float32,
                       device: torch.device | str = "cpu"):
    """The base model with each adapter loaded (named ``a0``, ``a1``...) and, for two or more, their
    mean (``MEAN``); in eval mode. Returns (PEFT model, adapter names)."""
    import peft
    from transformers import AutoModelForCausalLM

    if not adapter_dirs:
        raise ValueError("load_adapter_model needs at least one adapter directory")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)
    names = [f"a{i}" for i in range(len(adapter_dirs))]
    model = peft.PeftModel.from_pretrained(base, str(adapter_dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], adapter_dirs[1:], strict=True):
        model.load_adapter(str(d), adapter_name=name)
    if len(names) > 1:
        weights = [1.0 / len(names)] * len(names)
        model.add_weighted_adapter(names, weights, MEAN, combination_type="cat")
    return model.to(device).eval(), names


def sequence_nll(logits: Tensor, ids: Tensor, prefix: int) -> tuple[Tensor, Tensor]:
    """Per-sequence summed NLL of the prefix and of the window.

    Args:
        logits: ``[b, T, V]`` logits of ``ids`` (position t predicts token t+1).
        ids: ``[b, T]`` token ids.
        prefix: the router reads tokens ``0 .. prefix-1``.

    Returns:
        ``(prefix_nll [b], window_nll [b])``: NLL of tokens ``1 .. prefix-1`` (what the router may
        use) and of tokens ``prefix .. T-1`` (what is scored), fp64.
    """
    nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    nll = nll.double()
    return nll[:, : prefix - 1].sum(1), nll[:, prefix - 1:].sum(1)


def route(prefix_nll: torch.Tensor) -> torch.Tensor:
    """The router: the candidate with the lowest prefix NLL per sequence (``[C, b]`` -> ``[b]``);
    ties go to the earlier candidate."""
    return prefix_nll.argmin(dim=0)


class _Candidates:
    """Forward passes of one batch under the base, each adapter, and the merged adapter."""

    def __init__(self, model, names: list[str]):
        self.model, self.names = model, names

    def _logits(self, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
        if adapter is None:
            with self.model.disable_adapter():
                return self.model(input_ids=ids).logits
        self.model.set_adapter(adapter)
        return self.model(input_ids=ids).logits

    def run(self, ids: torch.Tensor, prefix: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[C + 1, b]`` prefix and window NLLs: base, adapters..., merged (last)."""
        merged = MEAN if len(self.names) > 1 else self.names[0]
        outs = [sequence_nll(self._logits(ids, a), ids, prefix)
                for a in [None, *self.names, merged]]
        return torch.stack([o[0] for o in outs]), torch.stack([o[1] for o in outs])


@torch.no_grad()
def score_domain(candidates: _Candidates, domain: Any, own: int | None, prefix: int,
                 batch_size: int, device: torch.device) -> dict[str, Any]:
    """Every view's perplexity on one domain's held-out set (``domain.eval``), all ranks together.

    Each rank scores every ``world_size``-th sequence; the sums are all-reduced. ``own`` is the
    domain's adapter index (None: it has none; the oracle then uses the base).
    """
    eval_ids, n = domain.eval["input_ids"], len(domain.eval)
    n_cand = len(candidates.names) + 1  # the base and each adapter: what the router chooses from
    oracle = 0 if own is None else own + 1
    # oracle full, oracle window, routed window, merged full, merged window, base window, correct
    sums = torch.zeros(7, dtype=torch.float64)
    choices = torch.zeros(n_cand, dtype=torch.float64)
    mine = np.arange(dist.rank(), n, dist.world_size())
    for b in range(0, len(mine), batch_size):
        rows = [eval_ids[int(i)] for i in mine[b:b + batch_size]]
        ids = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=device)
        pre, win = candidates.run(ids, prefix)
        pre, win = pre.cpu(), win.cpu()
        pick = route(pre[:n_cand])
        sums += torch.stack([
            (pre[oracle] + win[oracle]).sum(), win[oracle].sum(),
            win[:n_cand].gather(0, pick[None])[0].sum(), (pre[-1] + win[-1]).sum(), win[-1].sum(),
            win[0].sum(), (pick == oracle).double().sum(),
        ])
        choices += torch.bincount(pick, minlength=n_cand).double()
    totals = dist.all_reduce_sum(torch.cat([sums, choices]))
    seq_len = len(eval_ids[0])
    full_tokens, window_tokens = n * (seq_len - 1), n * (seq_len - prefix)

    def ppl(total: float, tokens: int) -> float:
        return math.exp(total / tokens)

    t = totals.tolist()
    return {
        "oracle_full": ppl(t[0], full_tokens), "oracle": ppl(t[1], window_tokens),
        "routed": ppl(t[2], window_tokens), "merged_full": ppl(t[3], full_tokens),
        "merged": ppl(t[4], window_tokens), "base": ppl(t[5], window_tokens),
        "correct": int(round(t[6])) if own is not None else None, "sequences": n,
        "choices": [int(round(c)) for c in t[7:]],
    }


def evaluate_frozen(cfg, base_dir: Path, adapters: list[tuple[str, Path]], domains: dict,
                    domain_names: list[str], prefix: int,
                    loader: Callable[..., Any] = load_adapter_model) -> dict[str, Any]:
    """Every view of one stage's row for a frozen-base run (collective: every rank calls it).

    Args:
        cfg: the run config (eval batch size, model dtype).
        base_dir: the frozen base model directory.
        adapters: (key, adapter directory) of every adapter trained so far, in training order.
        domains: packed domains by name (``.eval["input_ids"]`` is scored).
        domain_names: the matrix columns, in order.
        prefix: tokens the router reads.

    Returns:
        ``{view: {domain: perplexity}}`` for ``oracle``, ``routed``, ``merged``, ``base`` (window)
        and ``oracle_full``, ``merged_full`` (whole sequences), plus ``router`` (accuracy overall
        and per domain, choice counts) and the candidates, prefix and scored tokens.
    """
    from cltk.models import DTYPES

    keys = [k for k, _ in adapters]
    device = dist.device()
    dtype = DTYPES.get(cfg.model.dtype, torch.float32)
    model, names = loader(base_dir, [d for _, d in adapters], dtype, device)
    candidates = _Candidates(model, names)
    per = {d: score_domain(candidates, domains[d], keys.index(d) if d in keys else None, prefix,
                           cfg.eval.batch_size, device)
           for d in domain_names}
    del model, candidates
    views = ("oracle", "routed", "merged", "base", "oracle_full", "merged_full")
    out: dict[str, Any] = {v: {d: per[d][v] for d in domain_names} for v in views}
    scored = [d for d in domain_names if per[d]["correct"] is not None]
    right, total = sum(per[d]["correct"] for d in scored), sum(per[d]["sequences"] for d in scored)
    out["router"] = {
        "accuracy": right / total if total else None,
        "per_domain": {d: per[d]["correct"] / per[d]["sequences"] for d in scored},
        "choices": {d: dict(zip(["base", *keys], per[d]["choices"], strict=True))
                    for d in domain_names},
    }
    out.update(candidates=["base", *keys], prefix_tokens=prefix,
               scored_tokens_per_sequence=cfg.data.seq_len - prefix,
               merge="mean of the adapters' weight deltas")
    return out


# ----- the run's LoRA report ----------------------------------------------------------------------


def build_report(records: list[dict], report: Any, lcfg: Any, prefix: int) -> dict[str, Any]:
    """``OUT/lora_report.json``: a forgetting report per view, the router's accuracy, stage stats.

    ``records`` are the stages' ``lora_eval.json`` in order; ``report`` is the run's own report.
    """
    names, domains, stage_domains = report.stage_names, report.domain_names, report.stage_domains

    def view(key: str):
        return forgetting_report([[r[key][d] for d in domains] for r in records], names, domains,
                                 stage_domains)

    out: dict[str, Any] = {"base": lcfg.base, "per": lcfg.per, "r": lcfg.r, "alpha": lcfg.alpha,
                           "stats": [dict(r["stats"], stage=r["name"]) for r in records]}
    if lcfg.base == "frozen":
        out.update(prefix_tokens=prefix, merge=records[-1]["merge"],
                   scored="tokens after the router's prefix, the same tokens for every view")
        out["views"] = {v: view(v).to_dict() for v in VIEWS}
        out["views_full_sequence"] = {"oracle": report.to_dict(),
                                      "merged": view("merged_full").to_dict(),
                                      "latest": view("latest_full").to_dict()}
        out["router"] = [dict(r["router"], stage=r["name"]) for r in records]
    else:
        out["views_full_sequence"] = {"merged into the weights": report.to_dict()}
    return out


def format_report(rep: dict[str, Any]) -> str:
    """The LoRA report as text: the views side by side, the router, trainable share, size, speed."""
    from cltk.metrics import ForgettingReport

    lines = [f"LoRA (r={rep['r']}, alpha={rep['alpha']}, per {rep['per']}, base {rep['base']})"]
    if rep["base"] == "frozen":
        lines.append(f"scored after the router's {rep['prefix_tokens']}-token prefix:")
        lines.append(compare_reports({k: ForgettingReport.from_dict(v)
                                      for k, v in rep["views"].items()}))
        lines.append("whole sequences:")
        lines.append(compare_reports({k: ForgettingReport.from_dict(v)
                                      for k, v in rep["views_full_sequence"].items()}))
        acc = [f"{r['stage']} {r['accuracy']:.3f}" for r in rep["router"]
               if r["accuracy"] is not None]
        lines.append("router accuracy after each stage: " + ", ".join(acc))
        lines.append(f"merged view: {rep['merge']}")
    else:
        lines.append(compare_reports({k: ForgettingReport.from_dict(v)
                                      for k, v in rep["views_full_sequence"].items()}))
    for s in rep["stats"]:
        step = s.get("median_step_seconds")
        share = 100 * s["trainable_parameters"] / s["total_parameters"]
        lines.append(f"{s['stage']}: adapter '{s['key']}' {s['trainable_parameters']:,} "
                     f"trainable of {s['total_parameters']:,} ({share:.2f}%), "
                     f"{s.get('adapter_bytes', 0) / 1024:.1f} KB on disk, median step "
                     + (f"{step:.3f} s" if step else "n/a"))
    return "\n".join(lines)
