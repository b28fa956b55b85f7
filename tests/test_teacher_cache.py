"""The offline teacher cache: round trip, keys, stale refusal, atomic writes, equal forwards."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cltk.methods.kit.teacher import check_teacher_dir, checkpoint_key
from cltk.methods.soft_targets.teacher_cache import (
    MANIFEST,
    CacheKeys,
    StaleCacheError,
    TeacherCache,
    data_key,
    finalize,
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


def test_interrupted_build_leaves_no_cache_and_rebuilds(tmp_path):
    ids = _ids()
    keys = _keys(ids)
    with pytest.raises(RuntimeError, match="teacher died"):
        write_shard(tmp_path, keys, ids, Scorer(fail_at=2), 0, 2, 2)
    assert list(tmp_path.iterdir()) == []  # neither a shard nor a temp dir
    with pytest.raises(ValueError, match="no complete teacher cache"):
        TeacherCache(tmp_path, keys)
    write_shard(tmp_path, keys, ids, Scorer(), 0, 2, 2)
    with pytest.raises(ValueError, match="shard-00001-of-00002 is missing"):
        finalize(tmp_path, keys, 2)
    assert not (tmp_path / MANIFEST).exists()
    _build(tmp_path, ids, keys)  # a rebuild over the leftovers completes
    assert json.loads((tmp_path / MANIFEST).read_text())["rows"] == 7
    one = TeacherCache(tmp_path, keys).lookup(torch.as_tensor(ids[:1], dtype=torch.long))
    assert one[0].shape[0] == 1


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
