"""SPG importance on this rank's ZeRO partitions: per-tensor statistics across ranks, and a record of the
layout the importance was laid out in (saved beside it, checked when a new engine adopts it).

Each rank holds fragments of parameters (:mod:`cltk.methods.kit.zero_view`), so a tensor's mean and std need every
rank's share: two all-reduces of small vectors (per parameter: element count and sum, then the sum of
squared deviations from the mean), in float64. Then each rank scores its own fragments with its tensors'
global mean and std (:func:`cltk.methods.spg.importance.standardized_tanh`). Nothing full-sized is built.
ZeRO 0 in fp32 (layout ``plain``) holds every parameter whole on every rank: no reduction then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from cltk import distributed as dist
from cltk.errors import UserError
from cltk.methods.kit.zero_view import ZeroView
from cltk.methods.spg.importance import moments, standardized_tanh, sum64


class SpgLayoutError(UserError):
    """Saved SPG state was laid out for other partitions than this engine's."""


def replicated(view: ZeroView) -> bool:
    """Whether every rank holds every parameter whole (ZeRO 0, fp32): statistics need no reduction."""
    return view.layout == "plain"


def _segments(view: ZeroView, flats: Sequence[torch.Tensor], index: dict[str, int]):
    for part, flat in zip(view.partitions, flats, strict=True):
        flat = flat.reshape(-1)
        for f in part.fragments:
            yield index[f.name], flat[f.offset : f.offset + f.numel]


def tensor_moments(
    view: ZeroView, grads: Sequence[torch.Tensor], names: Sequence[str]
) -> list[tuple[float, float]]:
    """``(mean, std)`` of each parameter's whole gradient (unbiased std), from every rank's fragments.

    Collective unless :func:`replicated`: every rank calls it with the same ``names`` (all trainable
    parameters of the engine's module, in one order).

    Args:
        grads: one flat tensor per partition of ``view``, laid out like it.
        names: the parameters to report, in the order of the result.
    """
    index = {n: i for i, n in enumerate(names)}
    p = len(names)
    head = torch.zeros(2 * p, dtype=torch.float64)  # counts, then sums
    for j, seg in _segments(view, grads, index):
        head[j] += seg.numel()
        head[p + j] += sum64(seg)
    if not replicated(view):
        dist.all_reduce_sum(head)
    counts, sums = head[:p].tolist(), head[p:].tolist()
    means = [s / c if c else 0.0 for c, s in zip(counts, sums)]
    squares = torch.zeros(p, dtype=torch.float64)
    for j, seg in _segments(view, grads, index):
        squares[j] += sum64(seg, means[j], square=True)
    if not replicated(view):
        dist.all_reduce_sum(squares)
    return [moments(c, s, q) for c, s, q in zip(counts, sums, squares.tolist())]


def importance_from_grads(
    view: ZeroView, grads: Sequence[torch.Tensor], names: Sequence[str], in_place: bool = False
) -> list[torch.Tensor]:
    """SPG importance of every element this rank holds, laid out like ``view`` (collective).

    Args:
        grads: one flat float32 tensor per partition of ``view`` (e.g. gradients summed over steps).
        names: every trainable parameter, in one order on every rank (see :func:`tensor_moments`).
        in_place: write the importance over ``grads`` (saves a partition-sized tensor per rank).

    Returns:
        One float32 tensor per partition, on its gradient's device: ``|tanh(z)|`` on the parameters'
        elements (``z`` standardised over the whole parameter), 0 on padding.
    """
    stats = tensor_moments(view, grads, names)
    index = {n: i for i, n in enumerate(names)}
    out = []
    for part, g in zip(view.partitions, grads, strict=True):
        g = g.reshape(-1)
        imp = g if in_place else torch.zeros(part.numel, dtype=torch.float32, device=g.device)
        covered = 0
        for f in sorted(part.fragments, key=lambda f: f.offset):
            imp[covered : f.offset] = 0.0  # padding between fragments (ZeRO 3 pads each parameter)
            mean, std = stats[index[f.name]]
            seg = slice(f.offset, f.offset + f.numel)
            standardized_tanh(g[seg], mean, std, out=imp[seg])
            covered = f.offset + f.numel
        imp[covered:] = 0.0
        out.append(imp)
    return out


def layout_record(view: ZeroView) -> dict[str, torch.Tensor]:
    """The layout as tensors to save beside the importance: ``numel.<i>`` (partition i's size) and
    ``frag.<i>.<param>`` = ``[start, numel, offset]`` (see :class:`cltk.methods.kit.zero_view.Fragment`)."""
    rec: dict[str, torch.Tensor] = {}
    for i, part in enumerate(view.partitions):
        rec[f"numel.{i}"] = torch.tensor([part.numel])
        for f in part.fragments:
            rec[f"frag.{i}.{f.name}"] = torch.tensor([f.start, f.numel, f.offset])
    return rec


def _first_difference(now: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    for k in sorted(set(now) | set(saved)):
        if k not in saved:
            return f"{k} is new"
        if k not in now:
            return f"{k} is gone"
        if not torch.equal(now[k], saved[k]):
            return f"{k} was {saved[k].tolist()}, is {now[k].tolist()}"
    return None


def check_layout(view: ZeroView, saved: dict[str, torch.Tensor]) -> None:
    """Raise :class:`SpgLayoutError` on every rank if any rank's saved layout differs from ``view``'s
    (collective: a rank that alone raised would leave the others waiting in the next collective)."""
    diff = _first_difference(layout_record(view), saved)
    bad = dist.all_reduce_sum(torch.tensor([0.0 if diff is None else 1.0]))
    if float(bad[0]) > 0:
        where = f" (rank {dist.rank()}: {diff})" if diff else ""
        raise SpgLayoutError(
            "spg: the saved importance is laid out for other ZeRO partitions than this stage's "
            f"engine{where}. The model, the ZeRO stage or its partitioning settings, or the number "
            "of ranks changed between stages; SPG needs one layout through the whole run"
        )


def full_importance(rank_tensors: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-parameter importance, flat (``view(shape)`` to reshape), merged from every rank's saved SPG
    tensors (the ``"spg"`` entry of each ``methods_rank<r>.pt``). For inspection: it builds full
    tensors, which training never does."""
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for tensors in rank_tensors:
        for key, rec in tensors.items():
            if key.startswith("frag."):
                _, i, name = key.split(".", 2)
                start, numel, offset = (int(x) for x in rec.tolist())
                values = tensors[f"importance.{i}"].reshape(-1)[offset : offset + numel]
                pieces.setdefault(name, []).append((start, values))
    out = {}
    for name, parts in pieces.items():
        full = torch.zeros(max(s + v.numel() for s, v in parts))
        for s, v in parts:
            full[s : s + v.numel()] = v.float()
        out[name] = full
    return out


def load_full_importance(stage_dir: str | Path) -> dict[str, torch.Tensor]:
    """:func:`full_importance` of a stage directory (or checkpoint) written by any number of ranks."""
    files = sorted(Path(stage_dir).glob("methods_rank*.pt"))
    saved = [torch.load(f, map_location="cpu", weights_only=True).get("spg", {}) for f in files]
    return full_importance(saved)
