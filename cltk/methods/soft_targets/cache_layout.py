"""The packed teacher-cache record: an exact head, a sampled tail, ids at the vocabulary's bit width.

One fixed-size byte record per token position, ``bytes_per_token`` bytes (64 at the defaults)::

    bytes 0-3    float32  log q_y           the teacher's exact log-prob of the label y
    bytes 4-5    float16  a                 log-prob of the largest head entry
    bytes 6-7    float16  d                 quantisation step of the head's log-probs (> 0)
    then, bit-packed little-endian from bit 64:
                 head   x (id: b bits, code: 8 bits)   the ``head`` largest q_j with j != y,
                                                       log q_j ~ a - code * d
                 samples x id: b bits                  draws j ~ q_j / t over the rest (j != y,
                                                       j not in the head), t their total mass
    b = ceil(log2 vocab): 12 bits for 4,096 tokens, 16 for 49,152, 17 for 128,256

What the loss reads back (:func:`decode`) is a sparse estimate ``q^`` of the whole distribution
``q``: ``q_y`` exact, the head from its 8-bit codes, and every draw at weight ``t^ / samples`` with
``t^ = 1 - q_y - sum(head)``. Each draw hits token ``j`` with probability ``q_j / t``, so
``E[q^_j] = q_j`` for every tail token (up to the head's quantisation, which moves mass between the
head and ``t^``, not out of the sum): ``q^`` sums to 1 and ``E[q^] = q``. The soft-target loss is
linear in its target (``CE(q^) = -sum_j q^_j log s_j``, gradient ``s - q^``), so the loss and its
gradient from the cache are unbiased estimates of those from the full softmax, where a top-k cache
drops the tail and renormalises (a bias that stays however many steps average it). This is Sparse
Logit Sampling's importance sampling with the teacher itself as proposal (Anshumann et al. 2025,
arXiv 2503.16870), plus an exact head, which removes most of the sampling variance where the
teacher's mass is concentrated. Because ``q_y`` is exact and ``y`` is never a draw, the target's
label entry is ``lambda + (1 - lambda) q_y = p`` exactly.

Draws are seeded by each row's content hash (:func:`cltk.methods.soft_targets.teacher_cache.row_keys`),
so a rebuilt cache holds the same bytes whatever the world size, batch size or interruption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["HEADER_BYTES", "PackedLayout", "decode", "encode", "samples_for_budget"]

HEADER_BYTES = 8  # log q_y (fp32), a (fp16), d (fp16)
_CODE_BITS = 8
_FLOOR = -80.0  # log-probs below this are 0 in fp32 anyway (exp(-80) ~ 2e-35)


def id_bits(vocab: int) -> int:
    """Bits per token id: ``ceil(log2 vocab)``, at least 1."""
    return max(1, math.ceil(math.log2(vocab)))


def samples_for_budget(vocab: int, head: int, budget: int) -> int:
    """The most draws that fit a record of ``budget`` bytes with ``head`` exact entries (may be 0)."""
    b = id_bits(vocab)
    free = budget * 8 - HEADER_BYTES * 8 - head * (b + _CODE_BITS)
    return max(0, free // b)


@dataclass(frozen=True)
class PackedLayout:
    """The record's shape: ``head`` exact entries and ``samples`` draws over a ``vocab``."""

    vocab: int
    head: int
    samples: int

    def __post_init__(self) -> None:
        if not 0 <= self.head < self.vocab:
            raise ValueError(f"head must be in [0, vocab - 1 = {self.vocab - 1}], got {self.head}")
        if self.samples < 0 or self.head + self.samples == 0:
            raise ValueError(f"need head + samples > 0, got {self.head} + {self.samples}")

    @property
    def bits(self) -> int:
        return id_bits(self.vocab)

    @property
    def bytes_per_token(self) -> int:
        packed = self.head * (self.bits + _CODE_BITS) + self.samples * self.bits
        return HEADER_BYTES + math.ceil(packed / 8)

    @property
    def entries(self) -> int:
        """Entries of the decoded sparse target: the label, the head and the draws."""
        return 1 + self.head + self.samples


def _widths(lay: PackedLayout) -> list[int]:
    return [lay.bits] * lay.head + [_CODE_BITS] * lay.head + [lay.bits] * lay.samples


def _unpack(data: torch.Tensor, widths: list[int]) -> torch.Tensor:
    """``[N, B]`` uint8 -> ``[N, len(widths)]`` int64: fields of the given bit widths, in order."""
    n = data.shape[0]
    shifts = torch.arange(8, device=data.device, dtype=torch.uint8)
    bits = ((data.unsqueeze(-1) >> shifts) & 1).reshape(n, -1)  # one byte per bit, not eight
    out, at = [], 0
    runs: list[tuple[int, int]] = []  # (width, count), in order
    for w in widths:
        if runs and runs[-1][0] == w:
            runs[-1] = (w, runs[-1][1] + 1)
        else:
            runs.append((w, 1))
    for w, c in runs:
        chunk = bits[:, at:at + w * c].reshape(n, c, w)
        out.append((chunk.long() << torch.arange(w, device=data.device)).sum(-1))
        at += w * c
    return torch.cat(out, dim=1) if out else torch.zeros(n, 0, dtype=torch.long, device=data.device)


def _pack_fields(lay: PackedLayout, head_ids, codes, draws) -> torch.Tensor:
    """The bit-packed part of the record, in the order of the module doc."""
    parts = [(head_ids, lay.bits), (codes, _CODE_BITS), (draws, lay.bits)]
    bits = torch.cat([((v.unsqueeze(-1) >> torch.arange(w, device=v.device)) & 1).flatten(1)
                      .to(torch.uint8) for v, w in parts if v.shape[1]], dim=1)
    nbytes = lay.bytes_per_token - HEADER_BYTES
    bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - bits.shape[1]))
    weights = 1 << torch.arange(8, device=bits.device)
    return (bits.view(-1, nbytes, 8) * weights).sum(-1).to(torch.uint8)


def _bytes(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n]`` -> ``[n, itemsize]`` uint8: the values' bytes in ``dtype`` (a fresh dense copy)."""
    dense = torch.empty(x.shape[0], dtype=dtype, device=x.device).copy_(x)
    return dense.view(torch.uint8).view(x.shape[0], -1)


def _values(b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[n, itemsize]`` uint8 -> ``[n]`` values of ``dtype`` (through a fresh dense copy)."""
    return torch.empty(b.shape, dtype=torch.uint8, device=b.device).copy_(b).view(dtype).view(-1)


def encode(lay: PackedLayout, logprobs: torch.Tensor, labels: torch.Tensor,
           seeds: list[int]) -> torch.Tensor:
    """Records of ``b`` sequences.

    Args:
        lay: the layout.
        logprobs: ``[b, T-1, vocab]`` teacher log-probs (fp32), on any device.
        labels: ``[b, T-1]`` int64 the labels (the next tokens).
        seeds: one seed per sequence (its content hash): the draws of row ``i`` depend only on
            ``seeds[i]`` and its log-probs.

    Returns:
        ``[b, T-1, lay.bytes_per_token]`` uint8 on the log-probs' device.
    """
    b, t1, v = logprobs.shape
    if v != lay.vocab:
        raise ValueError(f"log-probs have vocab {v}, the layout {lay.vocab}")
    lp = logprobs.float().reshape(-1, v)
    y = labels.reshape(-1, 1).to(lp.device)
    label_lp = lp.gather(1, y).squeeze(1)
    # one [N, V] pass for the probabilities, then in place: the label (stored exactly) and the
    # head leave the distribution the draws come from
    probs = lp.exp().scatter_(1, y, 0.0)
    n = lp.shape[0]
    a = torch.zeros(n, device=lp.device)
    d = torch.ones(n, device=lp.device)
    head_ids = codes = torch.zeros(n, 0, dtype=torch.long, device=lp.device)
    if lay.head:
        head_ids = probs.topk(lay.head, dim=1).indices
        hv = lp.gather(1, head_ids).clamp(min=_FLOOR)
        a = hv[:, 0].half().float()
        d = ((a - hv[:, -1]) / (2**_CODE_BITS - 1)).clamp(min=1e-3).half().float()
        codes = ((a.unsqueeze(1) - hv) / d.unsqueeze(1)).round().clamp(0, 2**_CODE_BITS - 1).long()
    draws = torch.zeros(n, 0, dtype=torch.long, device=lp.device)
    if lay.samples:
        probs.scatter_(1, head_ids, 0.0)
        empty = probs.sum(1) <= 0  # no tail (tiny vocabularies): any id, decoded at weight ~0
        probs[empty] = 1.0
        probs = probs.view(b, t1, v)
        out = []
        for i, seed in enumerate(seeds):
            g = torch.Generator(device=lp.device).manual_seed(int(seed) & (2**63 - 1))
            out.append(torch.multinomial(probs[i], lay.samples, replacement=True, generator=g))
        draws = torch.cat(out).sort(dim=1).values  # sorted: equal ids side by side
    header = torch.cat([_bytes(label_lp, torch.float32), _bytes(a, torch.float16),
                        _bytes(d, torch.float16)], dim=1)
    record = torch.cat([header, _pack_fields(lay, head_ids, codes, draws)], dim=1)
    return record.view(b, t1, lay.bytes_per_token)


def decode(lay: PackedLayout, records: torch.Tensor,
           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse target ``q^`` of the module doc, in the form the top-k loss takes.

    Args:
        lay: the layout.
        records: ``[..., bytes_per_token]`` uint8.
        labels: ``[...]`` int64 the labels (the first entry of every target).

    Returns:
        ``(logprobs [..., entries] float32, ids [..., entries] int64, label_logprobs [...])``:
        ``log q^`` of the label, the head and each draw (a draw's weight is the tail's estimated
        mass over ``samples``; ``-inf`` where that mass is 0), their token ids, and ``log q_y``.
        ``exp(logprobs)`` sums to 1 (to rounding) wherever the head's codes leave mass for the tail.
    """
    shape = records.shape[:-1]
    r = records.reshape(-1, lay.bytes_per_token)
    n = r.shape[0]
    label_lp = _values(r[:, 0:4], torch.float32)
    a, d = _values(r[:, 4:6], torch.float16).float(), _values(r[:, 6:8], torch.float16).float()
    fields = _unpack(r[:, HEADER_BYTES:], _widths(lay))
    m = lay.head
    head_ids, codes, draws = fields[:, :m], fields[:, m:2 * m], fields[:, 2 * m:]
    head_lp = a.unsqueeze(1) - codes.float() * d.unsqueeze(1)
    y = labels.reshape(-1, 1).to(r.device).long()
    lps, ids = [label_lp.unsqueeze(1), head_lp], [y, head_ids]
    if lay.samples:
        left = 1.0 - label_lp.exp() - head_lp.exp().sum(1)
        w = (left.clamp(min=0.0) / lay.samples).log()  # -inf where nothing is left
        lps.append(w.unsqueeze(1).expand(n, lay.samples))
        ids.append(draws)
    out_lp, out_ids = torch.cat(lps, dim=1), torch.cat(ids, dim=1)
    return (out_lp.view(*shape, -1), out_ids.view(*shape, -1), label_lp.view(shape))
