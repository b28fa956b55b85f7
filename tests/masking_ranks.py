"""DAS masks under DeepSpeed on real ranks (run by tests/test_masking.py in the session's 2-rank launch):
how far units of importance 0, 0.9 and 1 move in 50 training steps.

Each run builds the same tiny Llama on every rank (odd sizes: ZeRO 3 pads, ZeRO 1/2 fragments straddle
ranks), masks it with a fixed importance pattern, trains 50 steps on per-rank random tokens and gathers
the full weights. Run kinds: ``update`` (update masks, AdamW with weight decay built by DeepSpeed from its
config), ``update_client`` (the same with a torch AdamW handed over), ``update_bf16`` (update masks, bf16
weights: DeepSpeed's BF16_Optimizer at ZeRO 1), ``update_offload`` (update masks, optimizer offloaded to
the CPU: DeepSpeedCPUAdam, compiled on first use), ``grad_sgd`` (gradient masks, SGD) and ``grad_adamw``
(gradient masks, AdamW: expected NOT to protect). Each run returns: mean |move| of importance-0 and 0.9
elements and their ratio, the largest move of importance-1 elements; for update runs the layout used,
that move after ``handle.remove()`` and (fp32) the element-by-element probe of the first step
(:func:`probe`); for ``update`` and ``update_offload`` the exact check of the first step against an
unmasked engine (:func:`exact`). ``importance`` / ``importance_bf16`` score DAS importance on the engine
(fp32 or bf16) and on the plain fp32 model, and return how far they differ (:func:`importance_agreement`).
"""

from __future__ import annotations

import torch

from tests.kit import ODD_SIZES, tiny_llama
from tests.kit.zero import ds_config, full_weights

STEPS, LR, WD = 50, 1e-2, 0.1
RUNS = ("update", "update_client", "update_bf16", "update_offload", "grad_sgd", "grad_adamw",
        "importance", "importance_bf16")


def masking_config(stage: int, deepspeed_adamw: bool, bf16: bool = False,
                   offload: bool = False) -> dict:
    """Micro-batch 4; with ``deepspeed_adamw`` DeepSpeed builds AdamW (weight decay) from the config."""
    optimizer = {"type": "AdamW", "params": {"torch_adam": True, "lr": LR, "weight_decay": WD}}
    extra = {"optimizer": optimizer} if deepspeed_adamw else {}
    return ds_config(stage, bf16=bf16, offload=offload, **extra)


def pattern(layers: int, heads: int, inter: int) -> dict[str, torch.Tensor]:
    """Importance 0.9, 1 and 0 on shuffled units; every shared KV head sees a mix of levels."""
    gen = torch.Generator().manual_seed(1)
    ffn = torch.zeros(layers, inter)
    for i in range(layers):
        perm = torch.randperm(inter, generator=gen)
        ffn[i, perm[: inter // 3]] = 0.9
        ffn[i, perm[inter // 3 : inter // 2]] = 1.0
    h = torch.tensor([[0.9, 0.9, 0.0, 0.0], [1.0, 0.0, 0.9, 0.0]])[:layers, :heads]
    return {"heads": h, "ffn": ffn}


def train(engine, steps: int, rank: int, offset: int = 0) -> None:
    gen = torch.Generator().manual_seed(1000 * rank + offset)
    for _ in range(steps):
        ids = torch.randint(0, 64, (4, 16), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()


def moves(before, after, masks) -> dict:
    """How far elements of importance 0, 0.9 and 1 moved.

    ``ratio``: per parameter, mean |move| of its 0.9 elements over that of its 0 elements, averaged
    over parameters weighted by their 0.9 elements. Per parameter, because gradient scales differ
    between parameters (k/v rows vs FFN rows) and the classes are not spread evenly over them.
    """
    zero, nine, one, per_param, weights = [], [], [], {}, {}
    for name, mask in masks.items():
        delta = (after[name] - before[name]).abs().flatten()
        s = (1.0 - mask).expand(before[name].shape).flatten()
        z, n = delta[s == 0], delta[(s > 0.5) & (s < 0.99)]
        zero.append(z)
        nine.append(n)
        one.append(delta[s >= 0.99])
        if z.numel() and n.numel():
            per_param[name] = (n.mean() / z.mean()).item()
            weights[name] = n.numel()
    zero, nine, one = (torch.cat(x) for x in (zero, nine, one))
    ratio = sum(per_param[k] * weights[k] for k in per_param) / sum(weights.values())
    return {
        "ratio": ratio,
        "pooled_ratio": (nine.mean() / zero.mean()).item(),
        "worst_param_ratio": max(per_param.values()),
        "zero_mean": zero.mean().item(),
        "one_max": one.max().item(),
        "counts": [zero.numel(), nine.numel(), one.numel()],
        "per_param": per_param,
    }


def probe(before, after, masks) -> dict:
    """Element by element after AdamW's first step, which moves every weight by about lr.

    Adam's first update is ``lr * g / (|g| + eps)`` ~ ``lr * sign(g)``, plus ``lr * wd * w``, so an
    element with mask m moves at most ``lr * m * (1 + wd * |w|)``: ``over`` counts elements that
    moved more than ``lr * (m + 0.02)``. A mask laid out on the wrong elements shows up there even
    where too few elements are involved to shift the ratios. (Moving less is normal where |g| is
    near Adam's eps, e.g. key biases, whose gradient is ~0: ``under`` is for information.)
    """
    over, under = 0, 0
    for name, mask in masks.items():
        got = (after[name] - before[name]).abs() / LR
        want = mask.expand(got.shape)
        over += int((got > want + 0.02).sum())
        under += int((got < want - 0.02).sum())
    return {"probe_over": over, "probe_under": under}


def exact(before, masked, free, masks) -> dict:
    """After one step from equal weights on equal data, each masked element's move must be its
    mask times the unmasked engine's move: the worst miss, relative to the step size (lr)."""
    worst, free_max = 0.0, 0.0
    for name, mask in masks.items():
        d_free = free[name] - before[name]
        want = mask.expand(d_free.shape) * d_free
        worst = max(worst, float((masked[name] - before[name] - want).abs().max()))
        free_max = max(free_max, float(d_free.abs().max()))
    return {"exact_err": worst / LR, "free_max": free_max / LR}


def optimizer_for(kind: str, model):
    if kind == "grad_sgd":
        return torch.optim.SGD(model.parameters(), lr=0.5)
    if kind in ("grad_adamw", "update_client"):
        return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    if kind == "update_offload":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(model.parameters(), lr=LR, weight_decay=WD, adamw_mode=True)
    return None


def first_step_free(stage: int, kind: str, rank: int) -> dict[str, torch.Tensor]:
    """The same engine without masks, one step: the free update the masked one is measured by."""
    import deepspeed

    model = tiny_llama(**ODD_SIZES)
    opt = optimizer_for(kind, model)
    config = masking_config(stage, opt is None, offload=kind == "update_offload")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    train(engine, 1, rank)
    out = full_weights(engine)
    engine.destroy()
    return out


def importance_agreement(stage: int, kind: str, rank: int) -> dict:
    """Importance scored on the engine (partitioned under ZeRO 3, bf16 for ``importance_bf16``)
    against the plain fp32 model every rank held before: raw scores and normalised ones."""
    import deepspeed

    from cltk.methods.das.importance import estimate_importance, normalize

    gen = torch.Generator().manual_seed(7 + rank)
    # rank 0 scores 3 batches, rank 1 two: under ZeRO 3 the ranks must still run equal passes
    batches = [{"input_ids": torch.randint(0, 64, (2, 16), generator=gen)}
               for _ in range(3 - rank)]
    plain = tiny_llama(**ODD_SIZES)
    engine, *_ = deepspeed.initialize(
        model=tiny_llama(**ODD_SIZES),
        config=masking_config(stage, True, bf16=kind == "importance_bf16"))
    out = {"stage": stage, "run": kind}
    for mode in ("proxy", "lm"):
        want = estimate_importance(plain, batches, mode=mode)
        got = estimate_importance(engine, batches, mode=mode)
        assert want.keys() == got.keys() == {"heads", "ffn", "embed", "head"}, got.keys()
        nw, ng = normalize(want), normalize(got)
        out[mode] = {
            k: {
                "raw_rel_err": float((got[k] - want[k]).abs().max() / want[k].abs().max()),
                "norm_max_err": float((ng[k] - nw[k]).abs().max()),
                "norm_mean_err": float((ng[k] - nw[k]).abs().mean()),
            }
            for k in want
        }
    engine.destroy()
    return out


def masks_under_zero(stage: int, kind: str) -> dict:
    import deepspeed

    from cltk import distributed as dist
    from cltk.methods.das.masking import attach_update_masks, param_masks, register_grad_masks
    from cltk.methods.das.units import build_unit_map

    rank = dist.rank()
    if kind.startswith("importance"):
        return importance_agreement(stage, kind, rank)
    free = first_step_free(stage, kind, rank) if kind in ("update", "update_offload") else None
    model = tiny_llama(**ODD_SIZES)
    umap = build_unit_map(model)
    masks = param_masks(model, pattern(umap.num_layers, umap.num_heads, umap.intermediate))
    if kind.startswith("grad"):
        register_grad_masks(model, masks)
    opt = optimizer_for(kind, model)
    config = masking_config(stage, opt is None, bf16=kind == "update_bf16",
                            offload=kind == "update_offload")
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    if stage == 3:  # the map also reads a partitioned model (full shapes from ds_shape)
        again = param_masks(
            engine.module, pattern(umap.num_layers, umap.num_heads, umap.intermediate)
        )
        assert again.keys() == masks.keys() and all(torch.equal(again[k], masks[k]) for k in masks)
    handle = attach_update_masks(engine, masks) if kind.startswith("update") else None
    before = full_weights(engine)
    train(engine, 1, rank)
    first = full_weights(engine)
    train(engine, STEPS - 1, rank, offset=2)
    after = full_weights(engine)
    out = {"stage": stage, "run": kind, **moves(before, after, masks)}
    if kind in ("update", "update_client"):  # fp32 AdamW: bf16 rounding would blur the reading
        out.update(probe(before, first, masks))
    if free is not None:
        out.update(exact(before, first, free, masks))
    if handle is not None:
        out["layout"], out["masked_numel_rank"] = handle.layout, handle.masked_numel
        handle.remove()
        train(engine, 3, rank, offset=1)
        out["one_max_after_remove"] = moves(after, full_weights(engine), masks)["one_max"]
    if hasattr(engine, "destroy"):  # free DeepSpeed's hooks and buffers before the next run
        engine.destroy()
    return out


def masks_under_zero_plan(plan: list[str], stages=(0, 1, 2, 3)) -> list[dict]:
    """Every run of ``plan`` at every stage (``"S:kind"``: at stage S only)."""
    from cltk import distributed as dist

    results = []
    for stage in stages:
        for spec in plan:
            only, _, kind = spec.rpartition(":")
            if kind not in RUNS:
                raise ValueError(f"{spec}: kind must be one of {RUNS}")
            if not only or int(only) == stage:
                results.append({**masks_under_zero(stage, kind), "world": dist.world_size()})
    return results
