"""The offline teacher cache: round trip, keys, stale refusal, atomic writes, equal forwards."""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cltk.methods.kit.teacher import check_teacher_dir, checkpoint_key
from cltk.methods.soft_targets.cache_layout import decode, encode
from cltk.methods.soft_targets.teacher_cache import (
    MANIFEST,
    CacheKeys,
    StaleCacheError,
    TeacherCache,
    build_cache,
    data_key,
    finalize,
    resume_point,
    row_keys,
    write_shard,
)

V, T = 50, 9


class Scorer:
    """A deterministic fake teacher: next-token log-probs depend on the current token only."""

    def __init__(self, fail_at: int | None = None):
        g = torch.Generator().manual_seed(0)
        self.table = F.log_softmax(3 * torch.randn(V, V, generator=g), -1)
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("teacher died")
        return self.table[ids[:, :-1]]


def _ids(n: int = 7, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=(n, T)).astype(np.int32)


def _keys(ids: np.ndarray, topk: int = 8, dtype: str = "float16") -> CacheKeys:
    return CacheKeys(
        teacher="t" * 64, data=data_key(ids), topk=topk, seq_len=T, vocab=V, logprob_dtype=dtype
    )


def _build(tmp, ids, keys, shards=2, batch=2, scorer=None):
    scorer = scorer or Scorer()
    for s in range(shards):
        write_shard(tmp, keys, ids, scorer, s, shards, batch)
    return finalize(tmp, keys, shards)


def test_round_trip_across_shards_in_any_order(tmp_path):
    ids = _ids()
    keys = _keys(ids, topk=8)
    manifest = _build(tmp_path, ids, keys)
    cache = TeacherCache(tmp_path, keys)
    assert len(cache) == 7 and manifest["rows"] == 7 and manifest["tokens"] == 7 * (T - 1)
    order = [6, 0, 3, 1]  # rows of both shards, shuffled: found by content, not position
    top_lp, top_ix, label = cache.lookup(torch.as_tensor(ids[order], dtype=torch.long))
    full = Scorer()(torch.as_tensor(ids[order], dtype=torch.long))
    ref_lp, ref_ix = full.topk(8, dim=-1)
    assert top_lp.shape == top_ix.shape == (4, T - 1, 8) and label.shape == (4, T - 1)
    assert torch.equal(top_ix, ref_ix)
    assert torch.allclose(top_lp, ref_lp, atol=2e-2, rtol=2e-3)  # fp16 storage
    ref_label = full.gather(-1, torch.as_tensor(ids[order, 1:], dtype=torch.long).unsqueeze(-1))
    assert torch.equal(label, ref_label.squeeze(-1))  # the label's log-prob is kept exactly (fp32)
    # compact: fp16 log-probs + uint16 ids + fp32 label, and the files hold what the keys say
    assert keys.bytes_per_token() == 8 * (2 + 2) + 4
    assert keys.bytes_per_token() <= manifest["bytes_per_token"] < keys.bytes_per_token() + 20
    with pytest.raises(ValueError, match="not in the teacher cache"):
        cache.lookup(torch.as_tensor(_ids(1, seed=9), dtype=torch.long))


def test_keys_depend_on_contents_not_order():
    ids = _ids()
    assert data_key(ids) == data_key(ids[::-1])
    changed = ids.copy()
    changed[3, 4] = (changed[3, 4] + 1) % V
    assert data_key(changed) != data_key(ids)
    assert len(set(row_keys(ids).tolist())) == 7
    assert row_keys(ids.astype(np.int64))[2] == row_keys(ids[2:3])[0]


def test_teacher_key_is_the_weights(tmp_path):
    with pytest.raises(ValueError, match="no full model export"):
        check_teacher_dir(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights-a")
    key = checkpoint_key(tmp_path)
    (tmp_path / "config.json").write_text('{"x": 1}')
    assert checkpoint_key(tmp_path) == key
    (tmp_path / "model.safetensors").write_bytes(b"weights-b")
    assert checkpoint_key(tmp_path) != key


def test_stale_cache_is_refused_naming_both_keys(tmp_path):
    ids = _ids()
    keys = _keys(ids)
    _build(tmp_path, ids, keys)
    other_teacher = replace(keys, teacher="u" * 64)
    with pytest.raises(StaleCacheError) as e:
        TeacherCache(tmp_path, other_teacher)
    assert "t" * 64 in str(e.value) and "u" * 64 in str(e.value) and "delete" in str(e.value)
    changed = ids.copy()
    changed[0, 0] = (changed[0, 0] + 1) % V
    both = f"data: cache has '{keys.data}'.*'{data_key(changed)}'"
    with pytest.raises(StaleCacheError, match=both):
        TeacherCache(tmp_path, replace(keys, data=data_key(changed)))
    with pytest.raises(StaleCacheError, match="topk"):
        TeacherCache(tmp_path, replace(keys, topk=4))
    # a shard left by another build is not mixed into a manifest
    write_shard(tmp_path / "mixed", other_teacher, ids, Scorer(), 0, 2, 2)
    write_shard(tmp_path / "mixed", keys, ids, Scorer(), 1, 2, 2)
    with pytest.raises(StaleCacheError, match="shard-00000-of-00002"):
        finalize(tmp_path / "mixed", keys, 2)


def _sampled(ids: np.ndarray, head: int = 3, samples: int = 5) -> CacheKeys:
    return CacheKeys("t" * 64, data_key(ids), 0, T, V, layout="sampled", head=head,
                     samples=samples)


def _bytes(d) -> dict[str, bytes]:
    return {f.relative_to(d).as_posix(): f.read_bytes() for f in sorted(d.rglob("*.npy"))}


@pytest.mark.parametrize("layout", ["topk", "sampled"])
def test_a_build_interrupted_mid_shard_resumes_to_the_same_bytes(tmp_path, layout):
    ids = _ids(11)  # shard 0: 6 rows = 6 batches of 1
    keys = _keys(ids) if layout == "topk" else _sampled(ids)
    whole = tmp_path / "whole"
    _build(whole, ids, keys, batch=1)
    d = tmp_path / "resumed"
    with pytest.raises(RuntimeError, match="teacher died"):  # dies scoring batch 5
        write_shard(d, keys, ids, Scorer(fail_at=5), 0, 2, 1, progress_every=2)
    with pytest.raises(ValueError, match="no complete teacher cache"):
        TeacherCache(d, keys)
    assert not (d / "shard-00000-of-00002").exists()  # only a partial build, under a temp name
    assert resume_point(d, keys, ids, 0, 2, 1) == 4  # recorded after batches 2 and 4
    assert resume_point(d, replace(keys, teacher="u" * 64), ids, 0, 2, 1) == 0  # other keys
    assert resume_point(d, keys, ids, 0, 2, 2) == 0  # another batch size
    scorer = Scorer()
    write_shard(d, keys, ids, scorer, 0, 2, 1)
    assert scorer.calls == 2  # batches 4 and 5 only
    assert resume_point(d, keys, ids, 0, 2, 1) == 6  # complete
    again = Scorer()  # a complete shard scores nothing (or padding, to keep ranks in step)
    write_shard(d, keys, ids, again, 0, 2, 1)
    write_shard(d, keys, ids, again, 0, 2, 1, start_batch=4)
    assert again.calls == 2
    write_shard(d, keys, ids, Scorer(), 1, 2, 1)
    finalize(d, keys, 2)
    assert _bytes(d) == _bytes(whole)
    # a partial build of other keys is not resumed into: it starts over
    e = tmp_path / "other"
    with pytest.raises(RuntimeError, match="teacher died"):
        write_shard(e, replace(keys, teacher="u" * 64), ids, Scorer(fail_at=4), 0, 2, 1,
                    progress_every=1)
    scorer = Scorer()
    write_shard(e, keys, ids, scorer, 0, 2, 1)
    assert scorer.calls == 6
    write_shard(e, keys, ids, Scorer(), 1, 2, 1)
    finalize(e, keys, 2)
    assert _bytes(e) == _bytes(whole)


def test_sampled_cache_is_world_size_independent_and_matches_its_record(tmp_path):
    ids = _ids(7)
    keys = _sampled(ids)
    assert keys.bytes_per_token() == 8 + (3 * (6 + 8) + 5 * 6 + 7) // 8  # 50 tokens: 6-bit ids
    m1 = _build(tmp_path / "one", ids, keys, shards=1, batch=3)
    _build(tmp_path / "two", ids, keys, shards=2, batch=2)
    assert m1["layout"] == "sampled" and m1["format"] == 2
    assert m1["bytes_per_record"] == keys.bytes_per_token()
    x = torch.as_tensor(ids[[5, 0, 2]], dtype=torch.long)
    a = TeacherCache(tmp_path / "one", keys).lookup(x)
    b = TeacherCache(tmp_path / "two", keys).lookup(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    # what the cache returns is the record of that row, decoded
    rec = encode(keys.packed(), Scorer()(x), x[:, 1:], row_keys(ids[[5, 0, 2]]).tolist())
    assert all(torch.equal(u, v) for u, v in zip(a, decode(keys.packed(), rec, x[:, 1:])))


def test_a_first_layout_cache_stays_readable_or_is_refused_in_one_line(tmp_path):
    ids = _ids()
    keys = _keys(ids)
    _build(tmp_path, ids, keys)
    for f in [tmp_path / MANIFEST, *tmp_path.glob("shard-*/meta.json")]:  # as format 1 wrote it
        old = json.loads(f.read_text())
        for k in ("layout", "head", "samples", "bytes_per_record", "build_s"):
            old.pop(k, None)
        f.write_text(json.dumps({**old, "format": 1} if f.name == MANIFEST else old))
    x = torch.as_tensor(ids[:2], dtype=torch.long)
    assert TeacherCache(tmp_path, keys).lookup(x)[0].shape == (2, T - 1, 8)
    with pytest.raises(StaleCacheError) as e:
        TeacherCache(tmp_path, _sampled(ids))
    msg = str(e.value)
    assert "\n" not in msg and "'topk' layout" in msg and "'sampled'" in msg
    assert "delete that directory to rebuild it" in msg and "blocks.cache_layout: topk" in msg


def test_every_shard_runs_the_same_number_of_teacher_forwards(tmp_path):
    ids = _ids(5)  # shard 0 holds 3 rows (2 batches), shard 1 holds 2 (1 batch + 1 padding batch)
    keys = _keys(ids)
    calls = []
    for s in range(2):
        scorer = Scorer()
        write_shard(tmp_path, keys, ids, scorer, s, 2, 2)
        calls.append(scorer.calls)
    assert calls == [2, 2]
    finalize(tmp_path, keys, 2)
    assert len(TeacherCache(tmp_path, keys)) == 5


def test_full_vocab_float32_cache_is_exact(tmp_path):
    ids = _ids()
    keys = _keys(ids, topk=V, dtype="float32")
    _build(tmp_path, ids, keys, shards=1)
    top_lp, top_ix, _ = TeacherCache(tmp_path, keys).lookup(torch.as_tensor(ids, dtype=torch.long))
    full = Scorer()(torch.as_tensor(ids, dtype=torch.long))
    assert torch.equal(full.gather(-1, top_ix), top_lp)


def test_token_ids_past_32767_survive_the_uint16_storage(tmp_path):
    big_v, ids = 40000, np.array([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=np.int32)

    def score(x: torch.Tensor) -> torch.Tensor:  # the teacher's favourite: token 39999 - current
        z = torch.zeros(x.shape[0], x.shape[1] - 1, big_v)
        return F.log_softmax(z.scatter(-1, (big_v - 1 - x[:, :-1]).unsqueeze(-1), 10.0), -1)

    keys = CacheKeys("t" * 64, data_key(ids), 2, 4, big_v)
    assert keys.index_dtype() == np.uint16
    write_shard(tmp_path, keys, ids, score, 0, 1, 2)
    finalize(tmp_path, keys, 1)
    _, top_ix, _ = TeacherCache(tmp_path, keys).lookup(torch.as_tensor(ids, dtype=torch.long))
    assert torch.equal(top_ix[..., 0], big_v - 1 - torch.as_tensor(ids[:, :-1], dtype=torch.long))


# ----- two ranks build one sampled-layout cache; the build dies part-way and resumes --------------
# Each rank's teacher dies at another batch (rank 0 after recording 4 batches, rank 1 after 2); the
# rebuild must start both ranks at batch 2 (a ZeRO-3 teacher needs equal forwards on every rank) and
# end with the cache a fresh single-process build writes.
def cache_build_resumed_on_two_ranks() -> list[dict]:
    """Every rank's account of the build (gathered to every rank); rank 0's ``same``: the resumed
    cache equals an uninterrupted build's."""
    from cltk import distributed as dist

    rank = dist.rank()
    made = tempfile.mkdtemp(prefix="cache_ranks") if rank == 0 else None
    tmp = Path(dist.broadcast_object(made))  # one directory, on both ranks
    try:
        ids = _ids(12)  # 6 batches of 1 a rank
        keys, where = _sampled(ids), tmp / "cache"
        try:  # progress recorded after every batch: rank 0 dies with 4 on disk, rank 1 with 2
            build_cache(where, keys, ids, Scorer(fail_at=5 if rank == 0 else 3), batch_size=1,
                        progress_every=1)
            died = None
        except RuntimeError as e:
            died = str(e)
        own = resume_point(where, keys, ids, rank, 2, 1)
        scorer = Scorer()
        manifest = build_cache(where, keys, ids, scorer, batch_size=1)
        x = torch.as_tensor(ids, dtype=torch.long)
        got = TeacherCache(where, keys).lookup(x)
        same = None
        if rank == 0:  # against what an uninterrupted build writes
            _build(tmp / "fresh", ids, keys, batch=1)
            ref = TeacherCache(tmp / "fresh", keys).lookup(x)
            same = all(torch.equal(a, b) for a, b in zip(got, ref))
        # the gather is the last use of the directory on both ranks
        return dist.all_gather_object({"died": died, "own": own, "calls": scorer.calls,
                                       "rows": manifest["rows"], "layout": manifest["layout"],
                                       "same": same})
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


@pytest.mark.multirank
@pytest.mark.on_two_ranks("cache_build_resumed_on_two_ranks")
def test_two_ranks_resume_a_cache_build_from_where_both_can(on_two_ranks):
    r0, r1 = on_two_ranks
    assert r0["died"] == r1["died"] == "teacher died"  # each rank's own error, neither hung
    assert (r0["own"], r1["own"]) == (4, 2)  # what each had recorded
    assert r0["calls"] == r1["calls"] == 4  # both resumed at batch 2 of 6: equal forwards
    assert r0["rows"] == 12 and r0["layout"] == "sampled"
    assert r0["same"] is True  # the bytes of an uninterrupted build


def test_the_default_blocks_section_asks_for_a_64_byte_sampled_cache():
    from cltk.config import ConfigError
    from cltk.methods.soft_targets import BlocksConfig, check
    from cltk.methods.soft_targets.method import cache_keys

    ids = _ids()
    # 8 exact entries (ids + 8-bit codes) and as many draws as the rest of 64 bytes holds
    for vocab, samples in ((4096, 24), (49152, 16), (128256, 14)):
        k = cache_keys(BlocksConfig(k=2), "t" * 64, ids, vocab)
        assert (k.layout, k.head, k.samples) == ("sampled", 8, samples)
        assert 60 <= k.bytes_per_token() <= 64
    old = cache_keys(BlocksConfig(k=2, cache_layout="topk"), "t" * 64, ids, 4096)
    assert (old.layout, old.topk, old.bytes_per_token()) == ("topk", 64, 260)
    assert cache_keys(BlocksConfig(k=2, cache_head=100), "t" * 64, ids, 50).head == 49
    with pytest.raises(ConfigError, match="blocks.cache_bytes"):
        check(None, BlocksConfig(k=2, cache_bytes=32, cache_head=8))
