"""Averages of the weights on this rank's ZeRO partitions, shared by the ``merge:`` and ``ema:`` methods.

A copy of the weights is kept the way DeepSpeed keeps the fp32 master weights (:mod:`cltk.methods.kit.zero_view`): one
flat fp32 tensor per partition of this rank, so under ZeRO 1/2/3 each rank holds ``1 / world`` of it.
:func:`write_back` puts values into those partitions and refreshes the model's own parameters (bf16 or
fp32, full under ZeRO 1/2, partitioned under ZeRO 3) from them, the way DeepSpeed does after an optimizer
step, so the engine's forward, its export and its next checkpoint all see the written weights.
These reach DeepSpeed internals (tested with 0.19.8): ``update_lp_params`` (ZeRO 1/2, BF16_Optimizer) and
``_reassign_or_swap_out_partitioned_parameters`` (ZeRO 3).
"""

from __future__ import annotations

import zlib

import torch

from cltk.methods.kit.zero_view import LayoutError, ZeroView


def layout_signature(view: ZeroView) -> torch.Tensor:
    """``[partitions, 2]`` int64: each partition's size and a CRC of which parameter elements sit
    where in it (tensors saved for one layout are refused by another)."""
    rows = []
    for part in view.partitions:
        text = ";".join(f"{f.name}:{f.start}:{f.numel}:{f.offset}" for f in part.fragments)
        rows.append([part.numel, zlib.crc32(text.encode())])
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2)


@torch.no_grad()
def snapshot(view: ZeroView) -> list[torch.Tensor]:
    """A copy of this rank's fp32 partitions (on their own device)."""
    return [p.tensor.detach().clone() for p in view.partitions]


@torch.no_grad()
def interpolate_(targets: list[torch.Tensor], sources: list[torch.Tensor], weight: float) -> None:
    """``target <- (1 - weight) * target + weight * source`` for each pair, in place, in fp32."""
    for t, s in zip(targets, sources, strict=True):
        t.lerp_(s.to(device=t.device, dtype=t.dtype), float(weight))


@torch.no_grad()
def write_back(engine, view: ZeroView, values: list[torch.Tensor] | None = None) -> None:
    """Copy ``values`` (one per partition; None: keep what the partitions hold) into this rank's fp32
    partitions, then refresh the model's own parameters from them on every rank (collective).

    Raises:
        LayoutError: an optimizer wrapper whose model parameters cltk does not know how to refresh.
    """
    if values is not None:
        for part, v in zip(view.partitions, values, strict=True):
            part.tensor.data.copy_(v.to(device=part.tensor.device, dtype=part.tensor.dtype))
    opt = engine.optimizer
    if view.layout == "plain":  # ZeRO 0 in fp32: the partitions are the parameters
        return
    if view.layout in ("zero1/2", "bf16"):
        opt.update_lp_params()  # this rank's fp32 partition -> its bit16 slice, then all-gather
        return
    if view.layout == "zero3":
        for g in range(len(opt.fp32_partitioned_groups_flat)):
            opt._reassign_or_swap_out_partitioned_parameters(g)
        if hasattr(opt, "invalidate_secondary_tensor"):  # ZeRO++ hpZ keeps a second copy
            opt.invalidate_secondary_tensor()
        return
    raise LayoutError(f"cltk cannot refresh the model's parameters of layout {view.layout!r}")


def check_averaging(cfg, key: str) -> None:
    """Config checks shared by ``merge:`` and ``ema:`` (at load, before any work).

    Both act on the fp32 master weights DeepSpeed's optimizer steps on; without ZeRO, bf16 / fp16 training
    hides them in a wrapper cltk cannot read. Both average the same weights over time, which a LoRA run
    does not have: it trains a new adapter per domain on a frozen base.
    """
    from cltk.config import ConfigError
    from cltk.methods.kit.zero_view import check_fp32_reachable
    from cltk.registry import active

    frozen = [spec.name for spec, section in active(cfg) if spec.freezes_base(section)]
    if frozen:
        raise ConfigError(
            key,
            f"with {frozen[0]} only a new adapter per domain trains on a frozen base: there are no "
            f"weights of before and after a stage to average (averaging adapters is another "
            f"method); use one of {key} or {frozen[0]}",
        )
    check_fp32_reachable(cfg, key, key)
