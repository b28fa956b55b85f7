"""The offline teacher: a sharded on-disk cache of the teacher's top-k log-probs for one stage.

Before a stage trains, one teacher pass over every sequence the stage's schedule will train (its
block plus any replay rows) stores, per token, the teacher's ``k`` largest log-probabilities with
their token ids and the exact log-probability of the correct token (which may fall outside the top
k).
Training then reads the cache through :func:`cltk.methods.kit.soft_losses.soft_target_loss_topk` and runs no teacher.

Layout of a cache directory::

    manifest.json                 written last (temp + rename): keys, shards, bytes per token
    shard-00000-of-00002/         one per rank, moved into place whole (temp dir + rename)
        meta.json                 the keys this shard was built with
        keys.npy                  uint64 [n]          content hash of each sequence (the row index)
        topk_logprobs.npy         float16 [n, T-1, k] (float32 on request)
        topk_indices.npy          uint16 [n, T-1, k]  (int32 when the vocabulary exceeds 65,535)
        label_logprobs.npy        float32 [n, T-1]    exact log q_y of the label

Rows are found by the content hash of their token ids, so the cache does not depend on the world
size, the micro-batch layout or the order of steps. A cache is keyed to its teacher (sha256 of the
weight files, :func:`cltk.methods.kit.teacher.checkpoint_key`) and its data (sha256 of every cached sequence's
token ids): opening it with other keys raises :class:`StaleCacheError` naming both. A build
interrupted before its manifest leaves no usable cache and is rebuilt from scratch.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cltk import distributed as dist
from cltk.errors import UserError

__all__ = [
    "MANIFEST",
    "CacheKeys",
    "StaleCacheError",
    "TeacherCache",
    "build_cache",
    "cache_exists",
    "data_key",
    "finalize",
    "row_keys",
    "write_shard",
]

MANIFEST = "manifest.json"
FORMAT = 1
_FILES = ("keys", "topk_logprobs", "topk_indices", "label_logprobs")
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
        logprob_dtype: storage dtype of the top-k log-probs (``float16`` or ``float32``).
    """

    teacher: str
    data: str
    topk: int
    seq_len: int
    vocab: int
    logprob_dtype: str = "float16"

    def index_dtype(self) -> np.dtype:
        small = self.vocab <= np.iinfo(np.uint16).max + 1
        return np.dtype(np.uint16) if small else np.dtype(np.int32)

    def bytes_per_token(self) -> int:
        """Bytes stored per cached token position (top-k log-probs + indices + label log-prob)."""
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


def _mismatch(found: dict, expect: CacheKeys, where: Path) -> str | None:
    """A message naming every differing key (found vs expected), or None when all match."""
    diffs = [f"{k}: cache has {found.get(k)!r}, this stage needs {v!r}"
             for k, v in asdict(expect).items() if found.get(k) != v]
    if not diffs:
        return None
    return (f"teacher cache {where} does not belong to this stage ({'; '.join(diffs)}). It was "
            "built for another teacher checkpoint or other data: delete that directory to rebuild "
            "it")


def write_shard(
    cache_dir: str | Path,
    keys: CacheKeys,
    ids: np.ndarray,
    score_fn: Callable[[torch.Tensor], torch.Tensor],
    shard: int,
    num_shards: int,
    batch_size: int,
) -> Path:
    """Score shard ``shard`` of ``ids`` (rows ``shard::num_shards``) and write it atomically.

    Every shard runs the same number of ``score_fn`` calls (short shards score a padding batch and
    drop it), as a ZeRO-3 teacher needs its ranks to run the same forwards.

    Args:
        cache_dir: the cache directory (created if missing).
        keys: the keys the shard is built with (``keys.topk <= keys.vocab``).
        ids: ``[n, T]`` token ids of every sequence of the cache (the same on every rank).
        score_fn: ``[b, T] int64 -> [b, T-1, V]`` teacher log-probs (fp32).
        shard, num_shards: this shard (usually the rank) and how many there are.
        batch_size: sequences per teacher forward.

    Returns:
        The shard directory, complete once it exists under its final name.
    """
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != keys.seq_len:
        raise ValueError(f"ids must be [n, seq_len={keys.seq_len}], got {tuple(ids.shape)}")
    if not 0 < keys.topk <= keys.vocab:
        raise ValueError(f"topk must be in [1, vocab={keys.vocab}], got {keys.topk}")
    if keys.logprob_dtype not in _TORCH:
        raise ValueError(f"logprob_dtype must be float16 or float32, got {keys.logprob_dtype!r}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    mine = ids[shard::num_shards]
    n, t1, k = len(mine), keys.seq_len - 1, keys.topk
    n_batches = math.ceil(math.ceil(len(ids) / num_shards) / batch_size)
    tmp = cache_dir / f".tmp-{_shard_name(shard, num_shards)}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        np.save(tmp / "keys.npy", row_keys(mine))
        mm = np.lib.format.open_memmap
        top_lp = mm(tmp / "topk_logprobs.npy", "w+", np.dtype(keys.logprob_dtype), (n, t1, k))
        top_ix = mm(tmp / "topk_indices.npy", "w+", keys.index_dtype(), (n, t1, k))
        label = mm(tmp / "label_logprobs.npy", "w+", np.float32, (n, t1))
        for b in range(n_batches):
            rows = mine[b * batch_size:(b + 1) * batch_size]
            pad = len(rows) == 0
            batch = torch.as_tensor((ids[:1] if pad else rows).astype(np.int64))
            lp = score_fn(batch)
            if pad:
                continue
            if lp.shape[-1] != keys.vocab or tuple(lp.shape[:-1]) != (len(rows), t1):
                raise ValueError(f"score_fn returned {tuple(lp.shape)}; expected "
                                 f"[{len(rows)}, {t1}, vocab={keys.vocab}]")
            # select where the scores are (the GPU): only [b, T-1, k] leaves the device
            vals, idx = lp.topk(k, dim=-1)
            lab = lp.gather(-1, batch[:, 1:].to(lp.device).unsqueeze(-1)).squeeze(-1)
            sl = slice(b * batch_size, b * batch_size + len(rows))
            top_lp[sl] = vals.to(_TORCH[keys.logprob_dtype]).cpu().numpy()
            top_ix[sl] = idx.cpu().numpy().astype(keys.index_dtype())
            label[sl] = lab.float().cpu().numpy()
        for arr in (top_lp, top_ix, label):
            arr.flush()
        del top_lp, top_ix, label
        meta = {**asdict(keys), "shard": shard, "num_shards": num_shards, "rows": n}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        final = cache_dir / _shard_name(shard, num_shards)
        if final.exists():  # a leftover of a build that died before its manifest
            shutil.rmtree(final)
        os.replace(tmp, final)
        return final
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def finalize(cache_dir: str | Path, keys: CacheKeys, num_shards: int) -> dict:
    """Check every shard against ``keys`` and write the manifest (the mark of a complete cache)."""
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
    manifest = {"format": FORMAT, **asdict(keys), "shards": shards, "rows": rows, "tokens": tokens,
                "bytes": nbytes, "bytes_per_token": nbytes / max(tokens, 1)}
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
) -> dict:
    """Every rank scores and writes its shard, then rank 0 writes the manifest (collective).

    Returns the manifest, on every rank.
    """
    rank, world = dist.rank(), dist.world_size()
    error = None
    try:
        write_shard(cache_dir, keys, ids, score_fn, rank, world, batch_size)
    except Exception as e:  # noqa: BLE001  (re-raised below) report after the barrier, so the other ranks do not hang on it
        error = e
    failed = dist.all_reduce_sum(torch.tensor([0.0 if error is None else 1.0]))
    if error is not None:
        raise error
    if failed.item():
        raise RuntimeError("another rank failed writing its teacher cache shard (see its log)")
    manifest = finalize(cache_dir, keys, world) if dist.is_main() else None
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
        self._shards = [{f: np.load(self.dir / s / f"{f}.npy", mmap_mode="r") for f in _FILES}
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
            ``input_ids[:, 1:]``.
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
