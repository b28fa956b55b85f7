"""DAS unit importance: gradients of a loss with respect to virtual gates on heads and FFN units.

Ke et al., "Continual Pre-training of Language Models" (ICLR 2023), section 3.1: put a gate of 1
on every unit (:func:`cltk.methods.das.units.attach_gates`), and score each unit by the mean over samples of
``|d loss / d gate|``. Two losses:

- ``"proxy"`` (DAS's choice for the general knowledge of the model): the KL divergence between the
  token distributions of two forward passes of the same batch with dropout on. Both passes differ
  only by dropout, so the loss measures how much each unit's output is sensitive to noise. The
  first pass is the target (no graph, no gradient through it): half the backward work and memory. The
  reference code ran these passes with dropout off (both passes equal, importance ~0); Llama-family
  models have no dropout at all. cltk therefore runs the passes in ``model.train()`` *and* adds
  dropout with ``p = proxy_dropout`` on every block's output for those passes only.
- ``"lm"``: the next-token loss of the batch (the model shifts labels = input_ids itself).

Differences from the reference code, on purpose: gradients are taken with ``torch.autograd.grad``
on the gates only (no gradient leaks between batches, parameters may be frozen, ``.grad`` of the
parameters is never touched) and accumulated as absolute values per batch, weighted by the batch's
number of sequences (the reference summed signed gradients that were never zeroed).

Dropout draws are seeded from the batch's contents, so a batch gets the same masks on whichever
rank it lands: with ``torch.distributed`` initialised, each rank scores its own share of samples,
sums and counts are all-reduced, and every rank gets the result one process would get on all the
data (up to float rounding).
"""

from __future__ import annotations

import os
import zlib
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from cltk import distributed as cdist
from cltk.methods.das.units import UnitMap, attach_gates, block_modules, build_unit_map, core_model

KEYS = ("heads", "ffn")
TOKEN_KEYS = ("embed", "head")  # optional: [V] importance of token rows


def estimate_importance(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    *,
    mode: str = "proxy",
    proxy_dropout: float = 0.1,
    num_samples: int | None = None,
    unit_map: UnitMap | None = None,
    seed: int = 0,
    tokens: bool = True,
) -> dict[str, torch.Tensor]:
    """Raw DAS importance of every head, FFN unit and token row of an HF causal LM.

    Args:
        model: the causal LM: plain, PEFT-wrapped, or a DeepSpeed engine (any ZeRO stage: scored
            on the engine's own, possibly partitioned, weights in its precision). Its training
            and ``requires_grad`` flags are switched off while it scores and restored on return.
        batches: dicts with ``input_ids`` ``[b, T]`` and optionally ``attention_mask`` ``[b, T]``
            (0 = padding, left out of the loss). On several ranks, each rank passes its own batches.
        mode: ``"proxy"`` (KL between two dropout passes) or ``"lm"`` (next-token loss).
        proxy_dropout: p of the dropout added on block outputs for the proxy passes.
        num_samples: sequences to score in total over all ranks (each rank takes its share:
            ``num_samples // world``, one more on the first ``num_samples % world`` ranks; the
            last batch is cut). None: every batch given.
        unit_map: the model's map; built when None.
        seed: mixed into the per-batch dropout seed.
        tokens: also score the token rows of the input embedding (``embed``) and of the LM head
            (``head``): a gate scaling row r, as for units.

    Returns:
        ``{"heads": [L, H], "ffn": [L, I]}`` (and ``"embed"``, ``"head"``: ``[V]``) float32 on
        CPU: mean over samples of |d loss / d gate|.

    Raises:
        ValueError: unknown mode, a bad ``proxy_dropout`` or ``num_samples``, or no samples at all.
    """
    if mode not in ("proxy", "lm"):
        raise ValueError(f"mode={mode!r}: use 'proxy' (KL of two dropout passes) or 'lm'")
    if not 0.0 <= proxy_dropout < 1.0:
        raise ValueError(f"proxy_dropout={proxy_dropout}: must be in [0, 1)")
    if num_samples is not None and num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: must be >= 1 (or None for all batches)")
    engine = core_model(model) is not model and hasattr(model, "optimizer")
    if engine:
        # The module, not engine.forward: the engine hooks every output it returns to run its
        # backward epilogue (gradient reduction, accumulation scaling) on any backward through it.
        # ZeRO 3 gathers and releases parameters in hooks on the module itself.
        model = model.module
    umap = unit_map or build_unit_map(model)
    device = next(model.parameters()).device
    gates = {
        "heads": torch.ones(umap.num_layers, umap.num_heads, device=device, requires_grad=True),
        "ffn": torch.ones(umap.num_layers, umap.intermediate, device=device, requires_grad=True),
    }
    rows = umap.tokens
    if tokens and rows is not None:
        gates["embed"] = torch.ones(rows.vocab, device=device, requires_grad=True)
        if rows.head_module is not None:
            gates["head"] = torch.ones(rows.vocab, device=device, requires_grad=True)
    sums = {k: torch.zeros(g.shape, dtype=torch.float64, device=device) for k, g in gates.items()}
    work = _this_ranks_batches(batches, num_samples, device)
    count = 0
    with _scoring_state(model, mode, proxy_dropout), _gated(model, umap, gates):
        for ids, mask, weight in _padded_for_zero3(model, work, device):
            if mode == "proxy":
                loss = _proxy_loss(model, ids, mask, seed)
            else:
                loss = _lm_loss(model, ids, mask)
            grads = torch.autograd.grad(loss, list(gates.values()), allow_unused=True)
            for key, g in zip(gates, grads):
                if g is not None and weight:  # a unit the loss does not reach has importance 0
                    sums[key] += g.detach().abs().double() * weight
            count += weight
    total = _all_reduce(sums, count)
    if total == 0:
        raise ValueError(
            "no samples were scored: give estimate_importance at least one batch "
            "(on every rank, or num_samples >= 1 overall)"
        )
    return {k: (s / total).float().cpu() for k, s in sums.items()}


def _this_ranks_batches(batches, num_samples: int | None, device) -> list[tuple]:
    """``(ids, mask)`` of the batches this rank scores, cut to its share of ``num_samples``."""
    share = None if num_samples is None else _rank_share(num_samples)
    out, count = [], 0
    for batch in batches:
        if share is not None and count >= share:
            break
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = None if mask is None else mask.to(device)
        if share is not None and count + ids.shape[0] > share:
            ids = ids[: share - count]
            mask = None if mask is None else mask[: share - count]
        out.append((ids, mask))
        count += ids.shape[0]
    return out


def _padded_for_zero3(model: nn.Module, work: list[tuple], device) -> list[tuple]:
    """``(ids, mask, weight)`` per pass. Under ZeRO 3 every forward gathers parameters from every
    rank, so all ranks run as many passes: a rank with fewer batches adds passes of weight 0."""
    out = [(ids, mask, ids.shape[0]) for ids, mask in work]
    zero3 = any(hasattr(p, "ds_id") for p in model.parameters())
    if not zero3 or not cdist.is_initialized():
        return out
    n = max(cdist.all_gather_object(len(out)))
    dummy = out[0][:2] if out else (torch.zeros(1, 2, dtype=torch.long, device=device), None)
    return out + [(*dummy, 0)] * (n - len(out))


def _rank_share(num_samples: int) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return num_samples
    world, rank = dist.get_world_size(), dist.get_rank()
    return num_samples // world + (1 if rank < num_samples % world else 0)


def _all_reduce(sums: dict[str, torch.Tensor], count: int) -> int:
    """Sum ``sums`` (in place) and ``count`` over ranks; returns the global count."""
    if not cdist.is_initialized():
        return count
    first = next(iter(sums.values()))
    flat = torch.cat(
        [s.flatten() for s in sums.values()]
        + [torch.tensor([float(count)], dtype=torch.float64, device=first.device)]
    )
    cdist.all_reduce_sum(flat)  # on the backend's device (NCCL needs the GPU)
    offset = 0
    for s in sums.values():
        s.copy_(flat[offset : offset + s.numel()].view_as(s))
        offset += s.numel()
    return int(round(flat[-1].item()))


@contextmanager
def _gated(model: nn.Module, umap: UnitMap, gates: dict[str, torch.Tensor]) -> Iterator[None]:
    handles = attach_gates(model, umap, **gates)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _scoring_state(model: nn.Module, mode: str, p: float) -> Iterator[None]:
    """Freeze parameters (only the gates need grads), set train/eval, add proxy dropout.

    Frozen, no layer keeps its input for a weight gradient: the graph holds half the activations.
    An engine's module is frozen the same way: DeepSpeed's gradient hooks sit on the parameters
    (``register_post_accumulate_grad_hook``) and stay when the flags come back.
    """
    was_training = model.training
    flags = [(q, q.requires_grad) for q in model.parameters()]
    handles = []
    try:
        for q, _ in flags:
            q.requires_grad_(False)
        model.train(mode == "proxy")
        if mode == "proxy" and p > 0:
            handles = [b.register_forward_hook(dropout_hook(p)) for b in block_modules(model)]
        yield
    finally:
        for h in handles:
            h.remove()
        for q, flag in flags:
            q.requires_grad_(flag)
        model.train(was_training)


def dropout_hook(p: float):
    def hook(module: nn.Module, args: tuple, output):
        if isinstance(output, torch.Tensor):
            return F.dropout(output, p, training=True)
        # Blocks returning (hidden, *extras): drop out the hidden states only.
        return (F.dropout(output[0], p, training=True), *output[1:])

    return hook


@contextmanager
def _batch_rng(ids: torch.Tensor, seed: int) -> Iterator[None]:
    """Seed every dropout draw from the batch's contents; the caller's RNG state is kept."""
    devices = [ids.device] if ids.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(zlib.crc32(ids.cpu().numpy().tobytes()) ^ seed)
        yield


def _proxy_loss(
    model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, seed: int
) -> torch.Tensor:
    """KL(p1 || p2) between two dropout passes (up to a constant), mean over real tokens.

    The first pass is the target and builds no graph; the gradient flows through the second. This
    keeps the proxy's cost at about one training step per batch (one forward without a graph,
    one with, one backward to the gates) and its memory at one graph, where a gradient through
    both passes costs two of each. It stays a measure of how sensitive each unit is to the
    dropout noise: with dropout off both passes are equal and every unit scores 0.
    """
    with _batch_rng(ids, seed):
        with torch.no_grad():
            p1 = F.softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        logits2 = model(input_ids=ids, attention_mask=mask).logits.float()
    # KL(p1 || p2) = H(p1, p2) - H(p1); H(p1) takes no gradient, so the soft-target cross-entropy
    # has the KL's gradient at fewer [b, T, V] passes (scores use gradients only).
    kl = -(p1 * F.log_softmax(logits2, -1)).sum(-1)  # [b, T]
    if mask is None:
        return kl.mean()
    keep = mask.bool()
    return kl[keep].mean()


def _lm_loss(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    labels = ids if mask is None else ids.masked_fill(~mask.bool(), -100)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def normalize(raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """DAS normalisation: per layer z-score, then ``|tanh(z)|``, into [0, 1].

    Note that DAS's ``|tanh|`` scores a unit far *below* its layer's mean as high as one far above;
    cltk keeps the published formula.

    Token rows (``embed``, ``head``: ``[V]``) are normalised the same way, the vocabulary being
    one layer.

    Args:
        raw: ``{"heads": [L, H], "ffn": [L, I]}`` (and optionally ``"embed"``, ``"head"``).

    Returns:
        The same keys and shapes, float32. A layer whose units all score the same gets zeros.
    """
    out = {}
    for key in _present(raw):
        x = raw[key].float()
        x2 = x[None] if x.dim() == 1 else x
        mean = x2.mean(dim=1, keepdim=True)
        std = x2.std(dim=1, keepdim=True)
        z = torch.where(std > 0, (x2 - mean) / std, torch.zeros_like(x2))
        out[key] = torch.tanh(z).abs().view_as(x)
    return out


def _present(imp: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    return KEYS + tuple(k for k in TOKEN_KEYS if k in imp)


def accumulate(
    prev: Mapping[str, torch.Tensor] | None, new: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Importance over stages: element-wise max (a unit stays as protected as it ever was).

    A token key present on one side only (e.g. a file from before token rows were scored) is kept.
    """
    if prev is None:
        return {k: new[k].clone() for k in _present(new)}
    out = {k: v.clone() for k, v in prev.items() if k in TOKEN_KEYS}
    out.update({k: v.clone() for k, v in new.items() if k in TOKEN_KEYS and k not in prev})
    both = KEYS + tuple(k for k in TOKEN_KEYS if k in prev and k in new)
    for k in both:
        if prev[k].shape != new[k].shape:
            raise ValueError(
                f"importance[{k!r}] shapes differ: {tuple(prev[k].shape)} before, "
                f"{tuple(new[k].shape)} now: the model's units changed between stages"
            )
    out.update({k: torch.maximum(prev[k], new[k].to(prev[k])) for k in both})
    return out


def check_importance(
    imp: Mapping[str, torch.Tensor], umap: UnitMap | None = None, where: str = "importance"
) -> None:
    """Raise ValueError unless ``imp`` holds finite ``heads``/``ffn`` in [0, 1] fitting ``umap``."""
    missing = [k for k in KEYS if k not in imp]
    if missing:
        raise ValueError(
            f"{where} lacks {missing}: expected tensors 'heads' [layers, heads] and "
            "'ffn' [layers, intermediate]"
        )
    for k in _present(imp):
        t = imp[k]
        ndim = 2 if k in KEYS else 1
        if t.dim() != ndim or not bool(torch.isfinite(t).all()):
            raise ValueError(
                f"{where}[{k!r}] must be a finite {ndim}-D tensor, got {tuple(t.shape)}"
            )
        if bool((t < 0).any() or (t > 1).any()):
            raise ValueError(
                f"{where}[{k!r}] has values outside [0, 1]: pass raw scores through "
                "cltk.methods.das.importance.normalize first"
            )
    if umap is not None:
        want = {
            "heads": (umap.num_layers, umap.num_heads),
            "ffn": (umap.num_layers, umap.intermediate),
        }
        if umap.tokens is not None:
            want.update(embed=(umap.tokens.vocab,), head=(umap.tokens.vocab,))
        for k in _present(imp):
            if tuple(imp[k].shape) != want[k]:
                raise ValueError(
                    f"{where}[{k!r}] is {tuple(imp[k].shape)} but the model "
                    f"({umap.arch}) has {want[k]}: it was computed for another model"
                )


def save_importance(path: str | os.PathLike, imp: Mapping[str, torch.Tensor]) -> None:
    """Write normalised importance as safetensors atomically: ``heads`` [L, H], ``ffn`` [L, I]
    and, when present, the token rows' ``embed`` / ``head`` [V]."""
    check_importance(imp)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    save_file({k: imp[k].detach().float().cpu().contiguous() for k in _present(imp)}, tmp)
    os.replace(tmp, path)


def load_importance(
    path: str | os.PathLike, model: nn.Module | None = None, unit_map: UnitMap | None = None
) -> dict[str, torch.Tensor]:
    """Read importance written by :func:`save_importance`, checked against the model's units.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: missing tensors, values outside [0, 1], or shapes that do not fit the model.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"no importance file at {os.fspath(path)!r}: it is written by "
            "save_importance at the end of a DAS stage; check the path"
        )
    imp = load_file(os.fspath(path))
    if unit_map is None and model is not None:
        unit_map = build_unit_map(model)
    check_importance(imp, unit_map, where=os.fspath(path))
    return {k: imp[k] for k in _present(imp)}
