"""DAS soft-masking that holds under Adam and ZeRO 1/2/3: scale the *update*, not the gradient.

DAS (Ke et al., ICLR 2023) protects the units that earlier domains found important by multiplying
their gradients by ``1 - importance``. Under Adam that protects nothing: Adam divides the gradient
by its own running RMS, so a constant factor c on a parameter's gradient cancels in ``m / sqrt(v)``
(measured here: rows whose gradient was scaled by 0.1 moved 1.02x as far as free rows), and
decoupled weight decay moves masked weights regardless. cltk therefore masks what moves the weights:
around the optimizer's ``step()`` it keeps the old values of the masked elements and blends
``old + m * (new - old)``, so the whole update (Adam, weight decay, clipping effects) is scaled by
``m = 1 - importance``; ``m = 0`` leaves an element exactly where it was.

The masks live where DeepSpeed keeps the fp32 master weights the torch optimizer steps on:

- ZeRO 0 (fp32): the module's own parameters.
- ZeRO 1/2 (and DeepSpeed's ``BF16_Optimizer``): one flat fp32 partition per group
  (``single_partition_of_fp32_groups[i]`` / ``fp32_groups_flat_partition[i]``); each parameter's
  ``_hp_mapping`` gives the start and length of its fragment in the flattened parameter
  (``lp_fragment_address``) and in the partition (``hp_fragment_address``).
- ZeRO 3: per sub-group, ``fp32_partitioned_groups_flat[g]`` holds, for each parameter of
  ``fp16_groups[g]`` in order, this rank's ``partition_numel()`` elements of the flattened
  parameter (``[rank * n, rank * n + n)``, padded past the end).

These are DeepSpeed internals, tested with DeepSpeed 0.19.8 (pyproject pins the range); a layout
that does not add up raises rather than masking the wrong elements. The cost is one fp32 copy of the
masked span of each partition per step, plus the mask itself.

Gradient masking (:func:`register_grad_masks`, the DAS original) is kept as an option: it is correct
for plain SGD only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.hooks import RemovableHandle

from cltk.importance import check_importance
from cltk.units import UnitMap, build_unit_map, full_shape

_CHUNK = 1 << 22  # elements per index chunk when laying masks out (bounds transient memory)


def param_masks(
    model: nn.Module,
    importance: Mapping[str, torch.Tensor],
    unit_map: UnitMap | None = None,
    tokens: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-parameter soft masks ``1 - importance`` on each unit's weights, 1 elsewhere.

    A KV head shared by several query heads (grouped-query attention) takes the max importance of
    the heads sharing it. With ``tokens`` and token importance in ``importance`` (``embed`` and
    ``head``, ``[V]`` each), the rows of the input embedding and the LM head are masked too; a tied
    embedding takes the max of both. Norms and output-projection biases are left out.

    Args:
        model: the model (plain, PEFT-wrapped, or ``engine.module``) whose names the masks use.
        importance: normalised ``{"heads": [L, H], "ffn": [L, I]}`` (and optionally ``"embed"``,
            ``"head"``: ``[V]``) in [0, 1].
        unit_map: the model's map; built when None.
        tokens: mask token rows (when ``importance`` has them).

    Returns:
        ``{param_name: mask}`` with ``mask`` float32 on CPU, broadcastable to the parameter's full
        shape: e.g. ``[rows, 1]`` for a row mask, ``[1, cols]`` for a column mask, ``[n]`` for a
        bias, ``[E, 1, I]`` for experts' columns (``mask.expand(shape)`` is the element mask). Kept
        compact on purpose: a full-size mask per parameter would cost as much memory as the model.
    """
    umap = unit_map or build_unit_map(model)
    check_importance(importance, umap)
    vectors: dict[str, torch.Tensor] = {}
    dims: dict[str, tuple[int, ...]] = {}

    def vector(name: str, unit_dims: tuple[int, ...]) -> torch.Tensor:
        if dims.setdefault(name, unit_dims) != unit_dims:
            raise ValueError(
                f"{name} has units along dims {dims[name]} and {unit_dims}: the "
                "unit map is inconsistent (a parameter may only be split one way)"
            )
        shape = umap.shapes[name]
        return vectors.setdefault(name, torch.ones(math.prod(shape[d] for d in unit_dims)))

    for layer, kind, s in umap.slices():
        scores = importance[kind][layer, s.offset : s.offset + len(s.members)].float().cpu()
        groups = s.positions.shape[0]
        group_s = torch.zeros(groups).scatter_reduce(0, s.members, scores, "amax")  # [G]
        vec = vector(s.param, s.dims)
        keep = (1.0 - group_s)[:, None].expand_as(s.positions)  # [G, k]
        vec[s.positions.flatten()] = torch.minimum(vec[s.positions.flatten()], keep.flatten())
    rows = umap.tokens
    if tokens and rows is not None:
        for key, name in (("embed", rows.embed_param), ("head", rows.head_param)):
            if name is not None and key in importance:
                vec = vector(name, (0,))
                torch.minimum(vec, 1.0 - importance[key].float().cpu(), out=vec)
    masks = {}
    for name, vec in vectors.items():
        shape = umap.shapes[name]
        view = [shape[d] if d in dims[name] else 1 for d in range(len(shape))]
        masks[name] = vec.view(view)
    return masks


def _named_params(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    missing = [n for n in masks if n not in params]
    if missing:
        raise ValueError(
            f"masks name parameters the model lacks, e.g. {missing[:3]}: build them "
            "with param_masks() on the same model (engine.module for an engine)"
        )
    for name, m in masks.items():
        shape = full_shape(params[name])
        if m.dim() != len(shape) or any(a not in (1, b) for a, b in zip(m.shape, shape)):
            raise ValueError(
                f"mask for {name} is {tuple(m.shape)}, not broadcastable to the "
                f"parameter's {tuple(shape)}: rebuild the masks for this model"
            )
    return {n: params[n] for n in masks}


def register_grad_masks(
    model: nn.Module, masks: Mapping[str, torch.Tensor]
) -> list[RemovableHandle]:
    """DAS's original masking: ``grad *= mask`` through ``param.register_hook``.

    Correct for plain SGD only: Adam-style optimizers normalise the gradient per element, which
    cancels a constant factor, and decoupled weight decay ignores the gradient. Call before
    ``deepspeed.initialize``: the hooks then run before DeepSpeed reduces the gradients (ZeRO 1, 2
    and 3).

    Returns:
        One handle per masked parameter; ``h.remove()`` detaches it.
    """
    handles = []
    for name, p in _named_params(model, masks).items():
        if not p.requires_grad:
            continue
        m = masks[name]
        # the model may move to its device after the hooks are set (deepspeed.initialize does)
        handles.append(p.register_hook(lambda g, m=m: g * m.to(device=g.device, dtype=g.dtype)))
    return handles


@dataclass
class _Target:
    """The masked span ``[lo, hi)`` of one tensor the torch optimizer steps on."""

    tensor: torch.Tensor
    lo: int
    hi: int
    weight: torch.Tensor  # [hi - lo] importance s = 1 - m: lerp weight towards the old value
    old: torch.Tensor  # [hi - lo] values before the step

    def span(self) -> torch.Tensor:
        return self.tensor.detach().view(-1)[self.lo : self.hi]


class UpdateMaskHandle:
    """Update masks attached to an engine's optimizer; :meth:`remove` detaches them."""

    def __init__(
        self, layout: str, targets: list[_Target], optimizers: list[torch.optim.Optimizer]
    ):
        self.layout = layout
        self.targets = {id(t.tensor): t for t in targets}
        self.masked_numel = sum(t.hi - t.lo for t in targets)
        self._pending: list[_Target] = []
        self._handles = []
        for opt in optimizers:
            self._handles += [
                opt.register_step_pre_hook(self._before),
                opt.register_step_post_hook(self._after),
            ]

    def _stepped(self, opt: torch.optim.Optimizer) -> list[_Target]:
        # ZeRO 3 steps one sub-group at a time, putting only its flat tensor in param_groups.
        return [
            self.targets[id(p)]
            for g in opt.param_groups
            for p in g["params"]
            if id(p) in self.targets
        ]

    @torch.no_grad()
    def _before(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        self._pending = self._stepped(opt)
        for t in self._pending:
            t.old.copy_(t.span())

    @torch.no_grad()
    def _after(self, opt: torch.optim.Optimizer, args, kwargs) -> None:
        for t in self._pending:
            # new + s * (old - new) = old + m * (new - old); lerp is exact at s = 0 and s = 1.
            t.span().lerp_(t.old, t.weight)
        self._pending = []

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _flat_values(mask: torch.Tensor, shape: torch.Size, start: int, numel: int) -> torch.Tensor:
    """Elements ``[start, start + numel)`` of ``mask.expand(shape).flatten()``, not expanding."""
    if start < 0 or start + numel > shape.numel():
        raise ValueError(
            f"elements [{start}, {start + numel}) fall outside a parameter of shape "
            f"{tuple(shape)}: the ZeRO layout does not match this DeepSpeed version"
        )
    strides = torch.empty(shape, device="meta").stride()
    mstrides = [0 if m == 1 else st for m, st in zip(mask.shape, mask.contiguous().stride())]
    flat = mask.contiguous().view(-1)
    out = []
    for lo in range(start, start + numel, _CHUNK):
        idx = torch.arange(lo, min(lo + _CHUNK, start + numel))
        where = torch.zeros_like(idx)
        for size, st, mst in zip(shape, strides, mstrides):
            if mst:
                where += (idx // st) % size * mst
        out.append(flat[where])
    return torch.cat(out) if out else flat.new_zeros(0)


def _target(tensor: torch.Tensor, weight: torch.Tensor) -> _Target | None:
    """Trim ``weight`` (flat, like ``tensor``) to its non-zero span; None when nothing is masked."""
    nz = torch.nonzero(weight).flatten()
    if nz.numel() == 0:
        return None
    lo, hi = int(nz[0]), int(nz[-1]) + 1
    w = weight[lo:hi].to(device=tensor.device, dtype=tensor.dtype)
    return _Target(tensor, lo, hi, w, torch.empty_like(w))


def _plain_targets(opt, by_id) -> list[_Target]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in by_id:
                name, mask = by_id[id(p)]
                w = (1.0 - mask).expand(p.shape).reshape(-1)
                if (t := _target(p, w)) is not None:
                    out.append(t)
    return out


def _hp_targets(lp_groups, partitions, by_id) -> list[_Target]:
    """ZeRO 1/2 and BF16_Optimizer: fragments located by each parameter's ``_hp_mapping``."""
    out = []
    for params, part in zip(lp_groups, partitions, strict=True):
        weight = torch.zeros(part.numel())
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if id(p) not in by_id or mapping is None:  # None: no fragment on this rank
                continue
            _, mask = by_id[id(p)]
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            if lp.numel != hp.numel or hp.start + hp.numel > part.numel():
                raise ValueError(
                    "DeepSpeed's _hp_mapping does not fit its partition: this "
                    "DeepSpeed version lays ZeRO 1/2 out differently (tested: 0.19.8)"
                )
            weight[hp.start : hp.start + hp.numel] = 1.0 - _flat_values(
                mask, full_shape(p), lp.start, lp.numel
            )
        if (t := _target(part, weight)) is not None:
            out.append(t)
    return out


def _zero3_targets(ds_opt, by_id) -> list[_Target]:
    out = []
    groups = ds_opt.fp16_groups
    pgs = getattr(ds_opt, "sub_group_process_groups", [None] * len(groups))
    for params, flat, pg in zip(groups, ds_opt.fp32_partitioned_groups_flat, pgs, strict=True):
        rank = dist.get_rank(group=pg)
        weight = torch.zeros(flat.numel())
        offset = 0
        for p in params:
            n = p.partition_numel()
            start = rank * n
            real = max(0, min(n, p.ds_numel - start))  # the last rank's share is padded
            if id(p) in by_id and real > 0:
                weight[offset : offset + real] = 1.0 - _flat_values(
                    by_id[id(p)][1], full_shape(p), start, real
                )
            offset += n
        if offset != flat.numel():
            raise ValueError(
                f"ZeRO 3 sub-group holds {flat.numel()} elements but its parameters' "
                f"partitions add up to {offset}: this DeepSpeed version lays ZeRO 3 "
                "out differently (tested: 0.19.8)"
            )
        if (t := _target(flat, weight)) is not None:
            out.append(t)
    return out


def attach_update_masks(engine, masks: Mapping[str, torch.Tensor]) -> UpdateMaskHandle:
    """Scale every optimizer update of the masked elements by their mask (call after initialize).

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` with an optimizer (a torch optimizer handed to or
            built by ``deepspeed.initialize``), ZeRO stage 0 (fp32), 1, 2 or 3.
        masks: from :func:`param_masks` on ``engine.module`` (or on the model given to
            ``initialize``: the names are the same). Frozen parameters are skipped.

    Returns:
        A handle; ``handle.remove()`` detaches the masks.

    Raises:
        ValueError: masks that do not fit the model, an optimizer wrapper whose layout is unknown
            (fp16/bf16 without ZeRO), or a ZeRO layout that does not add up.
    """
    params = _named_params(engine.module, masks)
    by_id = {id(p): (n, masks[n].float()) for n, p in params.items()}
    ds_opt = engine.optimizer
    if ds_opt is None:
        raise ValueError("the engine has no optimizer: pass one to deepspeed.initialize")
    if hasattr(ds_opt, "fp32_partitioned_groups_flat") and hasattr(ds_opt, "fp16_groups"):
        layout, targets = "zero3", _zero3_targets(ds_opt, by_id)
    elif hasattr(ds_opt, "single_partition_of_fp32_groups"):
        layout = "zero1/2"
        targets = _hp_targets(ds_opt.bit16_groups, ds_opt.single_partition_of_fp32_groups, by_id)
    elif hasattr(ds_opt, "fp32_groups_flat_partition"):
        layout = "bf16"
        targets = _hp_targets(ds_opt.bf16_groups, ds_opt.fp32_groups_flat_partition, by_id)
    elif isinstance(ds_opt, torch.optim.Optimizer) and not hasattr(ds_opt, "fp16_groups"):
        return UpdateMaskHandle("plain", _plain_targets(ds_opt, by_id), [ds_opt])
    else:
        raise ValueError(
            f"update masking does not know the layout of {type(ds_opt).__name__}: "
            "use fp32 or a ZeRO stage (1, 2, 3) for mixed precision, or mask='grad' "
            "with SGD"
        )
    inner = [ds_opt.optimizer]
    # ZeRO 3 with a partial optimizer offload steps some sub-groups with a second optimizer.
    if getattr(ds_opt, "backup_optimizer", None) is not None:
        inner.append(ds_opt.backup_optimizer)
    return UpdateMaskHandle(layout, targets, inner)
