"""Real 2-rank runs (deepspeed launcher, CPU, gloo) of soft-target blocks and distillation.

Four launches: the online teacher under ZeRO 2 and ZeRO 3, the offline cache with k = vocabulary
(which must reproduce the online run's training losses), and distillation once. All use replay, so
the teacher scores replay rows and the cache must hold them.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.multirank import run_ranks
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.multirank

COMMON = {"replay": {"share": 0.25}, "train": {"max_steps_per_stage": 4}}
# p = 0.3 puts most of the target's mass on the teacher, so its losses differ clearly from plain CE
BLOCKS = {"k": 2, "p": 0.3, "teacher": "online"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _train(cfg: Path) -> None:
    run_ranks(["cltk", "train", "--config", str(cfg)], module=True, timeout=900)


def _metrics(cfg: Path) -> list[dict]:
    with open(cfg.parent / "out" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _report(cfg: Path) -> dict:
    return json.loads((cfg.parent / "out" / "forgetting.json").read_text())


def _check_soft_target_run(cfg: Path) -> list[dict]:
    rows = _metrics(cfg)
    names = ("code-b0", "code-b1", "bible-b0", "bible-b1")
    assert [r["stage_name"] for r in rows] == [s for s in names for _ in range(4)]
    for r in rows:  # stage 0 is plain CE; every later stage reports its teacher
        assert ("teacher_p_label" in r["extra"]) == (r["stage"] != "0")
    matrix = _report(cfg)["perplexity"]
    assert len(matrix) == 4
    assert all(len(row) == 2 and all(1 < v < 1000 for v in row) for row in matrix)
    return rows


@pytest.fixture(scope="module")
def online_zero2(tmp_path_factory, cache):
    cfg = write_tiny_run(
        tmp_path_factory.mktemp("z2"), zero_stage=2, cache_dir=cache, blocks=BLOCKS, **COMMON
    )
    _train(cfg)
    return cfg


def _losses(rows: list[dict]) -> list[float]:
    return [float(r["loss"]) for r in rows]


def test_online_teacher_under_zero2_and_zero3(tmp_path, cache, online_zero2):
    rows2 = _check_soft_target_run(online_zero2)
    cfg3 = write_tiny_run(tmp_path, zero_stage=3, cache_dir=cache, blocks=BLOCKS, **COMMON)
    _train(cfg3)
    rows3 = _check_soft_target_run(cfg3)
    # a partitioned teacher scores like a full copy: the same losses step by step
    assert _losses(rows3) == pytest.approx(_losses(rows2), rel=1e-4)


def test_offline_cache_with_full_vocab_reproduces_the_online_losses(tmp_path, cache, online_zero2):
    cfg = write_tiny_run(
        tmp_path,
        zero_stage=2,
        cache_dir=cache,
        blocks={**BLOCKS, "teacher": "offline", "topk": 100000},
        **COMMON,
    )
    _train(cfg)
    rows = _check_soft_target_run(cfg)
    online = _metrics(online_zero2)
    assert _losses(rows) == pytest.approx(_losses(online), rel=2e-4)
    for a, b in zip(rows, online):
        if a["extra"]:
            pa, pb = (json.loads(r["extra"])["teacher_p_label"] for r in (a, b))
            assert pa == pytest.approx(pb, rel=1e-4)  # the teachers drift by fp16 storage
    caches = sorted((tmp_path / "out" / "teacher_cache").iterdir())
    assert [c.name for c in caches] == ["01-code-b1", "02-bible-b0", "03-bible-b1"]
    for c in caches:  # one shard per rank, keyed and complete
        m = json.loads((c / "manifest.json").read_text())
        assert m["shards"] == ["shard-00000-of-00002", "shard-00001-of-00002"]
        assert m["topk"] == m["vocab"] and m["bytes_per_token"] >= m["topk"] * 4 + 4
    # bible stages replay code rows: 4 steps x 6 new rows (batch 8, 2 replayed), and the replay rows
    assert json.loads((caches[1] / "manifest.json").read_text())["rows"] > 4 * 6


def test_distillation_run(tmp_path, cache):
    cfg = write_tiny_run(
        tmp_path,
        zero_stage=3,
        cache_dir=cache,
        distill={"alpha": 0.5, "beta": 0.5, "temperature": 2.0},
        **COMMON,
    )
    _train(cfg)
    rows = _metrics(cfg)
    assert {r["stage_name"] for r in rows} == {"code", "bible"}
    assert all(("teacher_p_label" in r["extra"]) == (r["stage"] == "1") for r in rows)
    matrix = _report(cfg)["perplexity"]
    assert len(matrix) == 2 and all(1 < v < 1000 for row in matrix for v in row)
