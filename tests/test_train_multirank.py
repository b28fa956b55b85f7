"""Real 2-rank continual runs through the deepspeed launcher (CPU, gloo): ZeRO 1, 2, 3 and resume.

One uninterrupted ZeRO-2 run (the ``reference`` fixture) serves as the ZeRO-2 case and as the run the
interrupted ones must reproduce.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.multirank import run_one, train_killed, train_ranks
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.multirank

SETTINGS = {"checkpoint_every": 2, "log_sequence_ids": True}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache) -> Path:
    """An uninterrupted 2-rank ZeRO-2 run; returns its config path."""
    cfg = write_tiny_run(tmp_path_factory.mktemp("ref"), cache_dir=cache, train=SETTINGS)
    train_ranks(cfg)
    return cfg


def report(cfg: Path) -> dict:
    return json.loads((cfg.parent / "out" / "forgetting.json").read_text())


def audit(cfg: Path, rank: int) -> list[tuple[int, int, list]]:
    lines = (cfg.parent / "out" / "sequence_ids" / f"rank{rank}.jsonl").read_text().splitlines()
    return [(x["stage"], x["step"], x["ids"]) for x in map(json.loads, lines)]


def check_run(cfg: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = cfg.parent / "out"
    matrix = report(cfg)["perplexity"]
    assert len(matrix) == 2 and all(len(r) == 2 for r in matrix)
    assert all(v > 1 for r in matrix for v in r)
    # each stage lowers perplexity on the domain it trains, below an untrained model's (~vocab size)
    assert matrix[0][0] < 400 and matrix[1][1] < matrix[0][1]
    for d in sorted((out / "stages").iterdir()):
        model = AutoModelForCausalLM.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
        assert (d / "model.safetensors").is_file() and (d / "stage.json").is_file()
        peaks = json.loads((d / "stage.json").read_text())["peak_memory_mb"]  # gathered from both ranks
        assert len(peaks) == 2 and all(50 < p["rss"] < 20000 for p in peaks)
        assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert (out / "checkpoints" / "latest").read_text().strip() == "s01-end"
    assert (out / "forgetting.png").stat().st_size > 1000 and (out / "forgetting.csv").is_file()
    # ranks train disjoint data, and together exactly the global batch of every step
    ranks = [audit(cfg, r) for r in (0, 1)]
    assert [(s, i) for s, i, _ in ranks[0]] == [(s, i) for s in (0, 1) for i in range(6)]
    for (sa, ia, a), (sb, ib, b) in zip(*ranks):
        assert (sa, ia) == (sb, ib)
        ids_a, ids_b = {tuple(x) for x in a}, {tuple(x) for x in b}
        assert len(ids_a) == len(ids_b) == 4 and not ids_a & ids_b
    # the LR schedule restarts every stage: each stage's first step has the warmup LR
    import csv

    rows = list(csv.DictReader(open(out / "metrics.csv")))
    firsts = [float(r["lr"]) for r in rows if r["step"] == "0"]
    assert len(firsts) == 2 and firsts[0] == firsts[1] < float(rows[1]["lr"])


def test_zero2_run_trains_exports_and_reports(reference):
    check_run(reference)
    check_perplexity_independently(reference)


def check_perplexity_independently(cfg_path: Path) -> None:
    """Each reported perplexity equals exp(mean next-token NLL) of the stage's export over the domain's
    held-out sequences, computed here with plain torch in one process (the run split the sequences
    over 2 ranks, evaluated through the DeepSpeed engine and all-reduced the sums)."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from cltk.data.prepare import prepare
    from cltk.validate import load_config

    cfg = load_config(cfg_path)
    _, domains = prepare(cfg)
    names = [d.name for d in cfg.domains]
    stages = sorted((cfg_path.parent / "out" / "stages").iterdir())
    for row, stage in zip(report(cfg_path)["perplexity"], stages):
        model = AutoModelForCausalLM.from_pretrained(str(stage), dtype=torch.float32).eval()
        for name, reported in zip(names, row):
            ids = torch.as_tensor(np.asarray(domains[name].eval["input_ids"], dtype=np.int64))
            with torch.no_grad():
                logits = model(input_ids=ids).logits[:, :-1].double()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            assert reported == pytest.approx(math.exp(nll.item()), rel=1e-5), (stage.name, name)


@pytest.mark.parametrize("zero", [1, 3])
def test_two_rank_run_trains_exports_and_reports(tmp_path, cache, zero):
    cfg = write_tiny_run(tmp_path, zero_stage=zero, cache_dir=cache, train=SETTINGS)
    train_ranks(cfg)
    check_run(cfg)


def test_replay_mixes_earlier_domains_into_later_stages(tmp_path, cache):
    # the same launch checks a run-long LR schedule: constant, then a cooldown over the last 40%
    lr = {"schedule": "wsd", "lr_span": "run", "decay_share": 0.4, "decay_shape": "1-sqrt"}
    cfg = write_tiny_run(
        tmp_path,
        cache_dir=cache,
        train={"log_sequence_ids": True, **lr},
        replay={"share": 0.25},
    )
    train_ranks(cfg)
    import csv

    from cltk.schedules import stage_lr_lambda
    from cltk.validate import load_config

    t = load_config(cfg).train
    logged = [float(r["lr"]) for r in csv.DictReader(open(tmp_path / "out" / "metrics.csv"))]
    expected = [t.lr * stage_lr_lambda(t, [6, 6], i)(s) for i in (0, 1) for s in range(6)]
    assert logged == pytest.approx(expected, rel=1e-3)  # metrics.csv keeps 4 digits
    assert logged[6] == logged[5] == t.lr  # stage 1 does not re-warm
    assert logged[-1] == pytest.approx(t.lr * t.min_lr_ratio)
    for rank in (0, 1):
        rows = audit(cfg, rank)
        stage0 = {d for s, _, ids in rows if s == 0 for d, _ in ids}
        stage1 = [d for s, _, ids in rows if s == 1 for d, _ in ids]
        assert stage0 == {0}  # nothing to replay in the first stage
        assert stage1.count(0) > 0 and stage1.count(1) > stage1.count(0)
    both = [d for r in (0, 1) for s, _, ids in audit(cfg, r) if s == 1 for d, _ in ids]
    assert both.count(0) == 6 * 2  # round(0.25 x 8) replayed sequences in each of the 6 steps


def test_resume_after_a_kill_mid_stage_matches_an_uninterrupted_run(tmp_path, cache, reference):
    cut = write_tiny_run(tmp_path, cache_dir=cache, train=SETTINGS)
    t0 = time.monotonic()
    # SIGKILL of rank 1 alone after step 3 of stage 1: the job must fail, not hang
    _, latest = train_killed(cut, "1:3:1")
    assert time.monotonic() - t0 < 240
    out = tmp_path / "out"
    assert latest == "s01-step000002"
    assert not (out / "forgetting.json").exists()
    train_ranks(cut, "--resume")
    for ra, rb in zip(report(reference)["perplexity"], report(cut)["perplexity"]):
        assert ra == pytest.approx(rb, rel=1e-6, abs=1e-6)
    # the audit log of the resumed run holds every (stage, step) exactly once, like the reference
    for r in (0, 1):
        assert audit(cut, r) == audit(reference, r)


def test_resume_at_another_world_size_through_a_universal_checkpoint(tmp_path, cache, reference):
    cut = write_tiny_run(tmp_path, cache_dir=cache, train=SETTINGS)
    assert train_ranks(cut, env={"CLTK_KILL_AT": "0:3"}, check=False).returncode != 0
    # 2 ranks x accumulation 2 -> 1 rank x accumulation 4: the same global batch and data order
    one = run_one(cut, "--resume", "--set", "train.gradient_accumulation_steps=4", timeout=600)
    assert one.returncode == 0, one.stderr[-4000:]
    assert "s00-step000002-universal" in one.stderr
    for ra, rb in zip(report(reference)["perplexity"], report(cut)["perplexity"]):
        assert ra == pytest.approx(rb, rel=1e-3)
