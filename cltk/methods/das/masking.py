"""DAS soft-masking that holds under Adam and ZeRO 1/2/3: scale the *update*, not the gradient.

DAS (Ke et al., ICLR 2023) protects the units that earlier domains found important by multiplying
their gradients by ``1 - importance``. Under Adam that protects nothing: Adam divides the gradient
by its own running RMS, so a constant factor c on a parameter's gradient cancels in ``m / sqrt(v)``
(measured here: rows whose gradient was scaled by 0.1 moved 1.02x as far as free rows), and
decoupled weight decay moves masked weights regardless. cltk therefore masks what moves the weights:
around the optimizer's ``step()`` it keeps the old values of the masked elements and blends
``old + m * (new - old)``, so the whole update (Adam, weight decay, clipping effects) is scaled by
``m = 1 - importance``; ``m = 0`` leaves an element exactly where it was.

The masks live where DeepSpeed keeps the fp32 master weights the torch optimizer steps on, found by
:mod:`cltk.methods.kit.zero_view` (ZeRO 0, 1, 2, 3 and DeepSpeed's ``BF16_Optimizer``); the blend around the step is
:class:`cltk.methods.kit.update_blend.UpdateBlend`, shared with SPG. The cost is one fp32 copy of the masked span of
each partition per step, plus the mask itself.

Gradient masking (:func:`register_grad_masks`, the DAS original) is kept as an option: it is correct
for plain SGD only.
"""

from __future__ import annotations

import math
from typing import Mapping

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from cltk.methods.das.importance import check_importance
from cltk.methods.das.units import UnitMap, build_unit_map
from cltk.methods.kit.update_blend import UpdateBlend
from cltk.methods.kit.zero_view import LayoutError, full_shape, zero_view

# the blend that scales the update (shared with SPG); the DAS name is kept for callers
UpdateMaskHandle = UpdateBlend


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
    _named_params(engine.module, masks)
    try:
        view = zero_view(engine)
    except LayoutError as e:
        raise LayoutError(f"update masking: {e}; or use mask='grad' with SGD") from e
    weights = view.lay_out({n: 1.0 - m.float() for n, m in masks.items()}, fill=0.0)
    return UpdateMaskHandle(view, weights)
