"""The offline teacher: a sharded on-disk cache of the teacher's soft targets for one stage.

Before a stage trains, one teacher pass over every sequence the stage's schedule will train (its
block plus any replay rows) stores, per token, a compact description of the teacher's distribution
and the exact log-probability of the correct token. Training then reads the cache through
:func:`cltk.methods.kit.soft_losses.soft_target_loss_topk` and runs no teacher.

Two layouts (``CacheKeys.layout``, recorded in every shard's ``meta.json`` and the manifest):

- ``sampled`` (the default, 64 bytes per token): one packed record per token, an exact head of the
  teacher's largest probabilities (8-bit log-probs against a per-token scale) and draws from the
  rest, ids at the vocabulary's bit width; it decodes to an unbiased estimate of the whole
  distribution (:mod:`.cache_layout`).
- ``topk`` (the first layout, 260 bytes per token at k = 64): the ``k`` largest log-probs in fp16,
  their ids, the label's fp32 log-prob; the loss renormalises over the k entries. A cache written
  before layouts existed (manifest ``format`` 1) is this layout.

Layout of a cache directory::

    manifest.json                 written last (temp + rename): keys, layout, shards, bytes per token
    shard-00000-of-00002/         one per rank, moved into place whole (temp dir + rename)
        meta.json                 the keys this shard was built with
        keys.npy                  uint64 [n]          content hash of each sequence (the row index)
        records.npy               uint8 [n, T-1, B]   layout sampled: one packed record per token
        topk_logprobs.npy         float16 [n, T-1, k] layout topk (float32 on request)
        topk_indices.npy          uint16 [n, T-1, k]  layout topk (int32 past 65,536 tokens)
        label_logprobs.npy        float32 [n, T-1]    layout topk: exact log q_y of the label

Rows are found by the content hash of their token ids, so the cache does not depend on the world
size, the micro-batch layout or the order of steps. A cache is keyed to its teacher (sha256 of the
weight files, :func:`cltk.methods.kit.teacher.checkpoint_key`) and its data (sha256 of every cached sequence's
token ids): opening it with other keys raises :class:`StaleCacheError` naming both. A build
interrupted before its manifest leaves no usable cache; the next build keeps the shards that were
complete and matching, scores the rest, and writes the same bytes an uninterrupted build would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cltk import distributed as dist
from cltk.errors import UserError
from cltk.methods.soft_targets.cache_layout import PackedLayout, decode, encode

__all__ = [
    "MANIFEST",
    "CacheKeys",
    "StaleCacheError",
    "TeacherCache",
    "build_cache",
    "cache_exists",
    "data_key",
    "encode_batch",
    "finalize",
    "resume_point",
    "row_keys",
    "write_shard",
]

MANIFEST = "manifest.json"
FORMAT = 2  # 1: the top-k layout before layouts were recorded
LAYOUTS = ("sampled", "topk")
_FILES = {"topk": ("keys", "topk_logprobs", "topk_indices", "label_logprobs"),
          "sampled": ("keys", "records")}
_TORCH = {"float16": torch.float16, "float32": torch.float32}


class StaleCacheError(UserError):
    """A cache built for another teacher, other data or another layout than the one asked for."""


@dataclass(frozen=True)
class CacheKeys:
    """What a cache was built from; every field must match to reuse it.

    Attributes:
        teacher: sha256 of the teacher's weight files.
        data: :func:`data_key` of the cached sequences.
        topk: log-probs kept per token.
        seq_len: tokens per sequence ``T`` (the cache holds ``T - 1`` positions).
        vocab: the teacher's vocabulary size.
        logprob_dtype: storage dtype of the top-k log-probs (``float16`` or ``float32``; layout
            ``topk``).
        layout: ``sampled`` (packed head + draws) or ``topk`` (see the module doc).
        head: exact entries per token (layout ``sampled``).
        samples: draws per token (layout ``sampled``).
    """

    teacher: str
    data: str
    topk: int
    seq_len: int
    vocab: int
    logprob_dtype: str = "float16"
    layout: str = "topk"
    head: int = 0
    samples: int = 0

    def index_dtype(self) -> np.dtype:
        small = self.vocab <= np.iinfo(np.uint16).max + 1
        return np.dtype(np.uint16) if small else np.dtype(np.int32)

    def packed(self) -> PackedLayout:
        """The record layout (layout ``sampled``)."""
        return PackedLayout(self.vocab, self.head, self.samples)

    def bytes_per_token(self) -> int:
        """Bytes stored per cached token position."""
        if self.layout == "sampled":
            return self.packed().bytes_per_token
        return self.topk * (np.dtype(self.logprob_dtype).itemsize + self.index_dtype().itemsize) + 4


def row_keys(ids: np.ndarray) -> np.ndarray:
    """uint64 [n] content hash (blake2b, 8 bytes) of each row of ``ids`` [n, T] (as int32)."""
    rows = np.ascontiguousarray(np.asarray(ids, dtype=np.int32))
    out = np.empty(len(rows), dtype=np.uint64)
    for i, r in enumerate(rows):
        out[i] = int.from_bytes(hashlib.blake2b(r.tobytes(), digest_size=8).digest(), "little")
    return out


def data_key(ids: np.ndarray) -> str:
    """sha256 of the token ids of the rows ``ids`` [n, T], independent of their order."""
    rows = np.asarray(ids, dtype=np.int32)
    # rows sorted by their content hash: equal hashes are equal rows, whose order cannot matter
    order = np.argsort(row_keys(rows), kind="stable")
    h = hashlib.sha256(f"{rows.shape}".encode())
    h.update(np.ascontiguousarray(rows[order]).tobytes())
    return h.hexdigest()


def _shard_name(shard: int, num_shards: int) -> str:
    return f"shard-{shard:05d}-of-{num_shards:05d}"


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _found_keys(found: dict) -> dict:
    """A shard's or manifest's keys, read as this version's: format 1 had only the topk layout."""
    return {"layout": "topk", "head": 0, "samples": 0, **found}


def _mismatch(found: dict, expect: CacheKeys, where: Path) -> str | None:
    """A message naming every differing key (found vs expected), or None when all match."""
    found = _found_keys(found)
    if found["layout"] != expect.layout:
        return (f"teacher cache {where} is in the {found['layout']!r} layout, this stage needs "
                f"{expect.layout!r} (blocks.cache_layout): delete that directory to rebuild it, or "
                f"set blocks.cache_layout: {found['layout']} to read it as it is")
    diffs = [f"{k}: cache has {found.get(k)!r}, this stage needs {v!r}"
             for k, v in asdict(expect).items() if found.get(k) != v]
    if not diffs:
        return None
    return (f"teacher cache {where} does not belong to this stage ({'; '.join(diffs)}). It was "
            "built for another teacher checkpoint or other data: delete that directory to rebuild "
            "it")


def _arrays(keys: CacheKeys, n: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """The files of a shard of ``n`` rows (besides ``keys.npy``): name -> (dtype, shape)."""
    t1 = keys.seq_len - 1
    if keys.layout == "sampled":
        return {"records": (np.dtype(np.uint8), (n, t1, keys.bytes_per_token()))}
    return {"topk_logprobs": (np.dtype(keys.logprob_dtype), (n, t1, keys.topk)),
            "topk_indices": (keys.index_dtype(), (n, t1, keys.topk)),
            "label_logprobs": (np.dtype(np.float32), (n, t1))}


def _check_keys(keys: CacheKeys) -> None:
    if keys.layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {keys.layout!r}")
    if keys.layout == "sampled":
        keys.packed()  # checks head and samples
        return
    if not 0 < keys.topk <= keys.vocab:
        raise ValueError(f"topk must be in [1, vocab={keys.vocab}], got {keys.topk}")
    if keys.logprob_dtype not in _TORCH:
        raise ValueError(f"logprob_dtype must be float16 or float32, got {keys.logprob_dtype!r}")


def encode_batch(keys: CacheKeys, lp: torch.Tensor, batch: torch.Tensor,
            seeds: np.ndarray) -> dict[str, np.ndarray]:
    """One scored batch ``lp`` [b, T-1, V] of the rows ``batch`` [b, T] (``seeds``: their
    :func:`row_keys`) in the layout's arrays; selected where the scores are (the GPU), so only the
    compact form leaves the device."""
    labels = batch[:, 1:].to(lp.device)
    if keys.layout == "sampled":
        rec = encode(keys.packed(), lp, labels, seeds.tolist())
        return {"records": rec.cpu().numpy()}
    vals, idx = lp.topk(keys.topk, dim=-1)
    lab = lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return {"topk_logprobs": vals.to(_TORCH[keys.logprob_dtype]).cpu().numpy(),
            "topk_indices": idx.cpu().numpy().astype(keys.index_dtype()),
            "label_logprobs": lab.float().cpu().numpy()}


def _progress(keys: CacheKeys, shard: int, num_shards: int, batch_size: int, rows: int) -> dict:
    return {**asdict(keys), "shard": shard, "num_shards": num_shards, "batch_size": batch_size,
            "rows": rows}


def _n_batches(ids: np.ndarray, num_shards: int, batch_size: int) -> int:
    return math.ceil(math.ceil(len(ids) / num_shards) / batch_size)


def resume_point(cache_dir: str | Path, keys: CacheKeys, ids: np.ndarray, shard: int,
                 num_shards: int, batch_size: int) -> int:
    """Batches of this shard already on disk: all of them when the shard is complete and built with
    ``keys``, those its partial build recorded (same keys, shards and batch size), else 0."""
    cache_dir = Path(cache_dir)
    rows = len(ids[shard::num_shards])
    meta = cache_dir / _shard_name(shard, num_shards) / "meta.json"
    if meta.is_file():
        found = json.loads(meta.read_text())
        if _mismatch(found, keys, meta.parent) is None and found.get("rows") == rows:
            return _n_batches(ids, num_shards, batch_size)
    prog = cache_dir / _partial_name(shard, num_shards) / "progress.json"
    if prog.is_file():
        found = json.loads(prog.read_text())
        want = _progress(keys, shard, num_shards, batch_size, rows)
        if {k: found.get(k) for k in want} == want:
            return int(found["batches"])
    return 0


def _partial_name(shard: int, num_shards: int) -> str:
    return f".partial-{_shard_name(shard, num_shards)}"


def _open_partial(part: Path, keys: CacheKeys, seeds: np.ndarray,
                  fresh: bool) -> dict[str, np.ndarray]:
    """The partial shard's arrays, memory-mapped: created anew, or opened to continue."""
    mm = np.lib.format.open_memmap
    if not fresh:
        return {f: mm(part / f"{f}.npy", "r+") for f in _arrays(keys, len(seeds))}
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir()
    np.save(part / "keys.npy", seeds)
    return {f: mm(part / f"{f}.npy", "w+", dt, sh) for f, (dt, sh) in _arrays(keys, len(seeds)).items()}


def write_shard(
    cache_dir: str | Path,
    keys: CacheKeys,
    ids: np.ndarray,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    shard: int,
    num_shards: int,
    batch_size: int,
    start_batch: int | None = None,
    progress_every: int = 16,
) -> Path:
    """Score shard ``shard`` of ``ids`` (rows ``shard::num_shards``) and write it atomically.

    The shard is written in ``.partial-<shard>/``, which records every ``progress_every`` batches
    how many are on disk, and moved to its final name once complete. A build that dies keeps its
    partial directory; the next one resumes after the last recorded batch (its draws are seeded
    by row content, so the bytes are those of an uninterrupted build). Every shard runs the same
    number of ``score_fn`` calls from ``start_batch`` on (short or complete shards score a padding
    batch and drop it), as a ZeRO-3 teacher needs its ranks to run the same forwards.

    Args:
        cache_dir: the cache directory (created if missing).
        keys: the keys the shard is built with.
        ids: ``[n, T]`` token ids of every sequence of the cache (the same on every rank).
        score_fn: ``[b, T] int64 -> [b, T-1, V]`` teacher log-probs (fp32).
        shard, num_shards: this shard (usually the rank) and how many there are.
        batch_size: sequences per teacher forward.
        start_batch: the batch to resume from; ``None``: this shard's own :func:`resume_point`
            (:func:`build_cache` passes the least over ranks).
        progress_every: batches between two progress records.

    Returns:
        The shard directory, complete once it exists under its final name.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != keys.seq_len:
        raise ValueError(f"ids must be [n, seq_len={keys.seq_len}], got {tuple(ids.shape)}")
    _check_keys(keys)
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    mine = ids[shard::num_shards]
    n, t1 = len(mine), keys.seq_len - 1
    n_batches = _n_batches(ids, num_shards, batch_size)
    own = resume_point(cache_dir, keys, ids, shard, num_shards, batch_size)
    start = own if start_batch is None else min(start_batch, own)
    final = cache_dir / _shard_name(shard, num_shards)
    complete = own == n_batches and (final / "meta.json").is_file()
    part = cache_dir / _partial_name(shard, num_shards)
    prog = _progress(keys, shard, num_shards, batch_size, n)
    seeds = row_keys(mine)
    arrays = {} if complete else _open_partial(part, keys, seeds, fresh=start == 0)
    for b in range(start, n_batches):
        rows = mine[b * batch_size:(b + 1) * batch_size]
        pad = complete or len(rows) == 0
        batch = torch.as_tensor((ids[:1] if pad else rows).astype(np.int64))
        lp = score_fn(batch)
        if pad:
            continue
        if lp.shape[-1] != keys.vocab or tuple(lp.shape[:-1]) != (len(rows), t1):
            raise ValueError(f"score_fn returned {tuple(lp.shape)}; expected "
                             f"[{len(rows)}, {t1}, vocab={keys.vocab}]")
        sl = slice(b * batch_size, b * batch_size + len(rows))
        for f, v in encode_batch(keys, lp, batch, seeds[sl]).items():
            arrays[f][sl] = v
        if (b + 1) % progress_every == 0 and b + 1 < n_batches:
            for arr in arrays.values():
                arr.flush()
            _write_json_atomic(part / "progress.json", {**prog, "batches": b + 1})
    if complete:
        return final
    for arr in arrays.values():
        arr.flush()
    del arrays
    meta = {**asdict(keys), "shard": shard, "num_shards": num_shards, "rows": n}
    (part / "meta.json").write_text(json.dumps(meta, indent=1))
    (part / "progress.json").unlink(missing_ok=True)
    if final.exists():  # a leftover of a build with other keys
        shutil.rmtree(final)
    os.replace(part, final)
    return final


def finalize(cache_dir: str | Path, keys: CacheKeys, num_shards: int,
             build_s: float | None = None) -> dict:
    """Check every shard against ``keys`` and write the manifest (the mark of a complete cache);
    ``build_s``, the seconds the build took, is recorded with it."""
    cache_dir = Path(cache_dir)
    shards, rows = [], 0
    for s in range(num_shards):
        d = cache_dir / _shard_name(s, num_shards)
        if not (d / "meta.json").is_file():
            raise ValueError(f"teacher cache shard {d} is missing: a rank failed while scoring")
        meta = json.loads((d / "meta.json").read_text())
        msg = _mismatch(meta, keys, d)
        if msg:
            raise StaleCacheError(msg)
        shards.append(d.name)
        rows += int(meta["rows"])
    nbytes = sum(f.stat().st_size for s in shards for f in (cache_dir / s).glob("*.npy"))
    tokens = rows * (keys.seq_len - 1)
    manifest = {"format": FORMAT, **asdict(keys), "bytes_per_record": keys.bytes_per_token(),
                "shards": shards, "rows": rows, "tokens": tokens,
                "bytes": nbytes, "bytes_per_token": nbytes / max(tokens, 1), "build_s": build_s}
    _write_json_atomic(cache_dir / MANIFEST, manifest)
    return manifest


def cache_exists(cache_dir: str | Path) -> bool:
    """A complete cache (its manifest) is at ``cache_dir``."""
    return (Path(cache_dir) / MANIFEST).is_file()


def build_cache(
    cache_dir: str | Path,
    keys: CacheKeys,
    ids: np.ndarray,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
    progress_every: int = 16,
) -> dict:
    """Every rank scores and writes its shard, then rank 0 writes the manifest (collective).

    Returns the manifest, on every rank.
    """
    rank, world = dist.rank(), dist.world_size()
    t0 = time.perf_counter()
    error = None
    # resume where every rank can: the ranks must run the same teacher forwards (ZeRO 3)
    own = resume_point(cache_dir, keys, ids, rank, world, batch_size)
    start = min(dist.all_gather_object(own))
    try:
        write_shard(cache_dir, keys, ids, score_fn, rank, world, batch_size, start_batch=start,
                    progress_every=progress_every)
    except Exception as e:  # noqa: BLE001  (re-raised below) report after the barrier, so the other ranks do not hang on it
        error = e
    failed = dist.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("another rank failed writing its teacher cache shard (see its log)")
    took = time.perf_counter() - t0
    manifest = finalize(cache_dir, keys, world, build_s=took) if dist.is_main() else None
    dist.barrier()
    return dist.broadcast_object(manifest)


class TeacherCache:
    """A complete cache, opened for reading (memory-mapped).

    Args:
        cache_dir: the cache directory.
        expect: the keys this stage needs; any difference raises :class:`StaleCacheError`.
    """

    def __init__(self, cache_dir: str | Path, expect: CacheKeys):
        self.dir = Path(cache_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise ValueError(f"no complete teacher cache at {self.dir} (no {MANIFEST}: never "
                             "built, or its build was interrupted); build it first (build_cache)")
        self.manifest = json.loads(path.read_text())
        msg = _mismatch(self.manifest, expect, self.dir)
        if msg:
            raise StaleCacheError(msg)
        self.keys = expect
        self._shards = [{f: np.load(self.dir / s / f"{f}.npy", mmap_mode="r")
                         for f in _FILES[expect.layout]}
                        for s in self.manifest["shards"]]
        self._pinned: dict[int, torch.Tensor] = {}
        self._copied: torch.cuda.Event | None = None
        self._index: dict[int, tuple[int, int]] = {}
        for si, sh in enumerate(self._shards):
            for row, key in enumerate(sh["keys"].tolist()):
                self._index[key] = (si, row)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def bytes_per_token(self) -> float:
        return float(self.manifest["bytes_per_token"])

    def lookup(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cached teacher of a micro-batch.

        Args:
            input_ids: ``[b, T]`` token ids, every row a sequence of the cache.

        Returns:
            ``(topk_logprobs [b, T-1, k] float32, topk_indices [b, T-1, k] int64,
            label_logprobs [b, T-1] float32)`` on ``input_ids``' device, aligned with the labels
            ``input_ids[:, 1:]``: for layout ``topk`` the k largest log-probs, for ``sampled``
            the ``1 + head + samples`` entries of the decoded estimate (:func:`.cache_layout.decode`),
            both as :func:`cltk.losses.soft_target_loss_topk` takes them.
        """
        ids = input_ids.detach().cpu().numpy()
        if ids.ndim != 2 or ids.shape[1] != self.keys.seq_len:
            raise ValueError(f"input_ids must be [b, seq_len={self.keys.seq_len}], got {ids.shape}")
        where = []
        for key in row_keys(ids).tolist():
            if key not in self._index:
                raise ValueError(
                    f"a sequence of this micro-batch is not in the teacher cache {self.dir}; the "
                    "cache covers only the stage's scheduled sequences: delete it to rebuild it "
                    "for the current schedule")
            where.append(self._index[key])
        if self.keys.layout == "sampled":
            rec = np.stack([self._shards[s]["records"][r] for s, r in where])
            (rec_t,) = self._to(input_ids.device, rec)
            return decode(self.keys.packed(), rec_t, input_ids[:, 1:])
        lp = np.stack([self._shards[s]["topk_logprobs"][r] for s, r in where])
        ix = np.stack([self._shards[s]["topk_indices"][r] for s, r in where])
        lab = np.stack([self._shards[s]["label_logprobs"][r] for s, r in where])
        unsigned = ix.dtype == np.uint16
        # Move the stored (compact) dtypes and widen on the device: a quarter of the bytes of
        # float32 + int64 crosses the bus. torch lacks uint16 ops: move its bits as int16.
        ix = ix.view(np.int16) if unsigned else ix
        lp_t, ix_t, lab_t = self._to(input_ids.device, lp, ix, lab)
        ix_t = ix_t.long()
        return lp_t.float(), (ix_t & 0xFFFF) if unsigned else ix_t, lab_t

    def _to(self, dev: torch.device, *arrays: np.ndarray) -> list[torch.Tensor]:
        """``arrays`` on ``dev``; to a GPU through reused pinned buffers and asynchronous copies."""
        if dev.type != "cuda":
            return [torch.from_numpy(a).to(dev) for a in arrays]
        if self._copied is not None:
            self._copied.synchronize()  # the last copies out of the buffers are done
        out = []
        for i, a in enumerate(arrays):
            src = torch.from_numpy(a).reshape(-1)
            buf = self._pinned.get(i)
            if buf is None or buf.numel() < src.numel() or buf.dtype != src.dtype:
                buf = self._pinned[i] = torch.empty(src.numel(), dtype=src.dtype, pin_memory=True)
            buf[: src.numel()].copy_(src)
            out.append(buf[: src.numel()].view(a.shape).to(dev, non_blocking=True))
        self._copied = torch.cuda.Event()
        self._copied.record()
        return out
