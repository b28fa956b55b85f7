"""This rank's view of what the torch optimizer steps on, under DeepSpeed ZeRO 0, 1, 2 and 3.

Methods that act on the update, the gradient or the fp32 master weights per element (DAS and SPG update
masks, EWC's penalty gradient, A-GEM's projection) need to know which elements of which parameter this rank
holds, and where. DeepSpeed keeps them in flat fp32 tensors:

- ZeRO 0 (fp32): the module's own parameters, one "partition" each.
- ZeRO 1/2 (and DeepSpeed's ``BF16_Optimizer``): one flat fp32 partition per group
  (``single_partition_of_fp32_groups[i]`` / ``fp32_groups_flat_partition[i]``); each parameter's
  ``_hp_mapping`` gives the start and length of its fragment in the flattened parameter
  (``lp_fragment_address``) and in the partition (``hp_fragment_address``).
- ZeRO 3: per sub-group, ``fp32_partitioned_groups_flat[g]`` holds, for each parameter of
  ``fp16_groups[g]`` in order, this rank's ``partition_numel()`` elements of the flattened parameter
  (``[rank * n, rank * n + n)``, padded past the end).

:func:`zero_view` reads that layout into :class:`Fragment` records; :meth:`ZeroView.lay_out` turns per-
parameter values (a mask, an importance) into tensors laid out like each partition, never expanding a full
parameter; :meth:`ZeroView.on_step` runs callbacks just before and after the torch optimizer steps a
partition, when its ``.grad`` holds the reduced (and clipped) gradient and the tensor the fp32 weights.
These are DeepSpeed internals, tested with DeepSpeed 0.19.8 (pyproject pins the range); a layout that does
not add up raises rather than touching the wrong elements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch
import torch.distributed as tdist
from torch import nn

_CHUNK = 1 << 22  # elements per index chunk when laying values out (bounds transient memory)


class LayoutError(ValueError):
    """DeepSpeed's optimizer is laid out in a way this module does not know or that does not add up."""


def full_shape(p: torch.Tensor) -> torch.Size:
    """A parameter's full shape, also when ZeRO 3 has partitioned it away (``ds_shape``)."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


@dataclass
class Fragment:
    """Elements ``[start, start + numel)`` of the flattened parameter ``name`` sit at
    ``[offset, offset + numel)`` of a partition."""

    name: str
    param: nn.Parameter
    start: int
    numel: int
    offset: int


@dataclass
class Partition:
    """A tensor the torch optimizer steps on (fp32 master weights) and the parameter fragments in it."""

    tensor: torch.Tensor
    fragments: list[Fragment] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return self.tensor.numel()


class ZeroView:
    """This rank's partitions of an engine's trainable parameters (see the module doc).

    Attributes:
        layout: ``"plain"`` (ZeRO 0, fp32), ``"zero1/2"``, ``"bf16"`` or ``"zero3"``.
        partitions: in the order the optimizer holds them.
        optimizers: the torch optimizers that step them (ZeRO 3 may have a second, for a partial offload).
    """

    def __init__(self, layout: str, partitions: list[Partition], optimizers: list[torch.optim.Optimizer]):
        self.layout, self.partitions, self.optimizers = layout, partitions, optimizers
        self._by_tensor = {id(p.tensor): p for p in partitions}

    @property
    def numel(self) -> int:
        """Elements this rank holds (padding included)."""
        return sum(p.numel for p in self.partitions)

    def lay_out(
        self, values: Mapping[str, torch.Tensor], fill: float = 0.0
    ) -> list[torch.Tensor]:
        """Per-parameter ``values`` (each broadcastable to its parameter's full shape, e.g. ``[rows, 1]``)
        laid out like each partition: a flat CPU float32 tensor per partition, ``fill`` where no value
        is given (other parameters, padding)."""
        out = []
        for part in self.partitions:
            flat = torch.full((part.numel,), float(fill))
            for f in part.fragments:
                if f.name in values:
                    flat[f.offset : f.offset + f.numel] = flat_values(
                        values[f.name].float(), full_shape(f.param), f.start, f.numel
                    )
            out.append(flat)
        return out

    def on_step(
        self,
        before: Callable[[list[tuple[int, Partition]]], None] | None = None,
        after: Callable[[list[tuple[int, Partition]]], None] | None = None,
    ) -> Callable[[], None]:
        """Call ``before`` / ``after`` with the ``(index, partition)`` pairs the optimizer is about to
        step / has stepped (ZeRO 3 steps one sub-group at a time); returns a function that detaches them.
        """
        index = {id(p.tensor): i for i, p in enumerate(self.partitions)}

        def stepped(opt: torch.optim.Optimizer) -> list[tuple[int, Partition]]:
            return [
                (index[id(t)], self._by_tensor[id(t)])
                for g in opt.param_groups
                for t in g["params"]
                if id(t) in self._by_tensor
            ]

        handles = []
        for opt in self.optimizers:
            if before is not None:
                handles.append(opt.register_step_pre_hook(lambda o, a, k: before(stepped(o))))
            if after is not None:
                handles.append(opt.register_step_post_hook(lambda o, a, k: after(stepped(o))))

        def remove() -> None:
            for h in handles:
                h.remove()
            handles.clear()

        return remove


def flat_values(values: torch.Tensor, shape: torch.Size, start: int, numel: int) -> torch.Tensor:
    """Elements ``[start, start + numel)`` of ``values.expand(shape).flatten()``, not expanding."""
    if start < 0 or start + numel > shape.numel():
        raise LayoutError(
            f"elements [{start}, {start + numel}) fall outside a parameter of shape "
            f"{tuple(shape)}: the ZeRO layout does not match this DeepSpeed version"
        )
    if values.dim() != len(shape) or any(a not in (1, b) for a, b in zip(values.shape, shape)):
        raise LayoutError(f"values of shape {tuple(values.shape)} do not broadcast to {tuple(shape)}")
    strides = torch.empty(shape, device="meta").stride()
    vstrides = [0 if m == 1 else st for m, st in zip(values.shape, values.contiguous().stride())]
    flat = values.contiguous().view(-1)
    out = []
    for lo in range(start, start + numel, _CHUNK):
        idx = torch.arange(lo, min(lo + _CHUNK, start + numel))
        where = torch.zeros_like(idx)
        for size, st, vst in zip(shape, strides, vstrides):
            if vst:
                where += (idx // st) % size * vst
        out.append(flat[where])
    return torch.cat(out) if out else flat.new_zeros(0)


def _plain(opt: torch.optim.Optimizer, names: dict[int, str]) -> list[Partition]:
    out = []
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in names:
                out.append(Partition(p, [Fragment(names[id(p)], p, 0, p.numel(), 0)]))
    return out


def _hp(lp_groups, partitions, names: dict[int, str]) -> list[Partition]:
    """ZeRO 1/2 and BF16_Optimizer: fragments located by each parameter's ``_hp_mapping``."""
    out = []
    for params, tensor in zip(lp_groups, partitions, strict=True):
        part = Partition(tensor)
        for p in params:
            mapping = getattr(p, "_hp_mapping", None)
            if id(p) not in names or mapping is None:  # None: no fragment on this rank
                continue
            lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
            if lp.numel != hp.numel or hp.start + hp.numel > tensor.numel():
                raise LayoutError(
                    "DeepSpeed's _hp_mapping does not fit its partition: this DeepSpeed version "
                    "lays ZeRO 1/2 out differently (tested: 0.19.8)"
                )
            part.fragments.append(Fragment(names[id(p)], p, lp.start, lp.numel, hp.start))
        out.append(part)
    return out


def _zero3(ds_opt, names: dict[int, str]) -> list[Partition]:
    out = []
    groups = ds_opt.fp16_groups
    pgs = getattr(ds_opt, "sub_group_process_groups", [None] * len(groups))
    for params, flat, pg in zip(groups, ds_opt.fp32_partitioned_groups_flat, pgs, strict=True):
        rank = tdist.get_rank(group=pg)
        part = Partition(flat)
        offset = 0
        for p in params:
            n = p.partition_numel()
            start = rank * n
            real = max(0, min(n, p.ds_numel - start))  # the last rank's share is padded
            if id(p) in names and real > 0:
                part.fragments.append(Fragment(names[id(p)], p, start, real, offset))
            offset += n
        if offset != flat.numel():
            raise LayoutError(
                f"ZeRO 3 sub-group holds {flat.numel()} elements but its parameters' partitions add up "
                f"to {offset}: this DeepSpeed version lays ZeRO 3 out differently (tested: 0.19.8)"
            )
        out.append(part)
    return out


def zero_view(engine) -> ZeroView:
    """This rank's partitions of ``engine``'s trainable parameters, named as in ``engine.module``.

    Raises:
        LayoutError: an engine without an optimizer, or an optimizer wrapper whose layout is unknown
            (fp16/bf16 without ZeRO).
    """
    names = {id(p): n for n, p in engine.module.named_parameters() if p.requires_grad}
    ds_opt = engine.optimizer
    if ds_opt is None:
        raise LayoutError("the engine has no optimizer: pass one to deepspeed.initialize")
    if hasattr(ds_opt, "fp32_partitioned_groups_flat") and hasattr(ds_opt, "fp16_groups"):
        layout, parts = "zero3", _zero3(ds_opt, names)
    elif hasattr(ds_opt, "single_partition_of_fp32_groups"):
        layout = "zero1/2"
        parts = _hp(ds_opt.bit16_groups, ds_opt.single_partition_of_fp32_groups, names)
    elif hasattr(ds_opt, "fp32_groups_flat_partition"):
        layout, parts = "bf16", _hp(ds_opt.bf16_groups, ds_opt.fp32_groups_flat_partition, names)
    elif isinstance(ds_opt, torch.optim.Optimizer) and not hasattr(ds_opt, "fp16_groups"):
        return ZeroView("plain", _plain(ds_opt, names), [ds_opt])
    else:
        raise LayoutError(
            f"cltk does not know the layout of DeepSpeed's {type(ds_opt).__name__}: use fp32 or a ZeRO "
            "stage (1, 2, 3) for mixed precision"
        )
    inner = [ds_opt.optimizer]
    # ZeRO 3 with a partial optimizer offload steps some sub-groups with a second optimizer.
    if getattr(ds_opt, "backup_optimizer", None) is not None:
        inner.append(ds_opt.backup_optimizer)
    return ZeroView(layout, parts, inner)


def check_fp32_reachable(cfg, key: str, who: str) -> None:
    """Refuse, at load, a run whose fp32 master weights no partition view can reach: ZeRO stage 0 with
    bf16 / fp16 hides them in DeepSpeed's wrapper. ``key`` names the config section in the error,
    ``who`` the method in its text (EWC, merge, ema)."""
    from cltk.distributed import bf16_available
    from cltk.ds_config import load_deepspeed_json
    from cltk.errors import ConfigError

    path = cfg.resolve(cfg.deepspeed)
    ds = load_deepspeed_json(path)
    if (ds.get("zero_optimization") or {}).get("stage", 0) != 0:
        return
    for prec in ("bf16", "fp16"):
        enabled = (ds.get(prec) or {}).get("enabled", False)
        if enabled is True or (prec == "bf16" and enabled == "auto" and bf16_available()):
            raise ConfigError(
                key,
                f"{path}: ZeRO stage 0 with {prec} keeps the fp32 weights where {who} cannot reach "
                "them; use ZeRO stage 1, 2 or 3 (e.g. ds_configs/zero1.json), or fp32",
            )
