"""Real 2-rank continual runs through the deepspeed launcher (CPU, gloo): ZeRO 1, 2, 3 and resume."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.multirank import run_ranks
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.multirank


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def train(cfg: Path, *extra: str, env=None, check=True):
    return run_ranks(
        ["cltk", "train", "--config", str(cfg), *extra],
        module=True,
        env=env,
        check=check,
        timeout=900,
    )


def report(cfg: Path) -> dict:
    return json.loads((cfg.parent / "out" / "forgetting.json").read_text())


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_two_rank_run_trains_exports_and_reports(tmp_path, cache, zero):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = write_tiny_run(
        tmp_path, zero_stage=zero, cache_dir=cache, train={"log_sequence_ids": True}
    )
    train(cfg)
    out = tmp_path / "out"
    rep = report(cfg)
    matrix = rep["perplexity"]
    assert len(matrix) == 2 and all(len(r) == 2 for r in matrix)
    assert all(v > 1 for r in matrix for v in r)
    # each stage lowers perplexity on the domain it trains, below an untrained model's (~vocab size)
    assert matrix[0][0] < 400 and matrix[1][1] < matrix[0][1]
    for d in sorted((out / "stages").iterdir()):
        model = AutoModelForCausalLM.from_pretrained(str(d))
        tok = AutoTokenizer.from_pretrained(str(d))
        assert (d / "model.safetensors").is_file() and (d / "stage.json").is_file()
        assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert (out / "checkpoints" / "latest").read_text().strip() == "s01-end"
    assert (out / "forgetting.png").stat().st_size > 1000 and (out / "forgetting.csv").is_file()
    # ranks train disjoint data, and together exactly the global batch
    ranks = [
        [json.loads(x) for x in (out / "sequence_ids" / f"rank{r}.jsonl").read_text().splitlines()]
        for r in (0, 1)
    ]
    assert len(ranks[0]) == len(ranks[1]) == 12
    for a, b in zip(*ranks):
        assert (a["stage"], a["step"]) == (b["stage"], b["step"])
        ids_a, ids_b = {tuple(x) for x in a["ids"]}, {tuple(x) for x in b["ids"]}
        assert len(ids_a) == len(ids_b) == 4 and not ids_a & ids_b


def test_resume_after_a_kill_mid_stage_matches_an_uninterrupted_run(tmp_path, cache):
    common = dict(cache_dir=cache, train={"checkpoint_every": 2, "log_sequence_ids": True})
    ref = write_tiny_run(tmp_path / "ref", **common)
    train(ref)
    cut = write_tiny_run(tmp_path / "cut", **common)
    t0 = time.monotonic()
    # SIGKILL of rank 1 alone after step 3 of stage 1: the job must fail, not hang
    killed = train(cut, env={"CLTK_KILL_AT": "1:3:1", "DEEPSPEED_TIMEOUT": "2"}, check=False)
    assert killed.returncode != 0
    assert time.monotonic() - t0 < 240
    out = tmp_path / "cut" / "out"
    assert (out / "checkpoints" / "latest").read_text().strip() == "s01-step000002"
    assert not (out / "forgetting.json").exists()
    refused = train(cut, check=False)  # a fresh start must not overwrite the run
    assert refused.returncode != 0 and "--resume" in refused.stdout
    train(cut, "--resume")
    a, b = report(ref), report(cut)
    for ra, rb in zip(a["perplexity"], b["perplexity"]):
        assert ra == pytest.approx(rb, rel=1e-6, abs=1e-6)
    # the audit log of the resumed run holds every (stage, step) exactly once, like the reference
    for r in (0, 1):

        def steps(run):
            lines = (
                (tmp_path / run / "out" / "sequence_ids" / f"rank{r}.jsonl")
                .read_text()
                .splitlines()
            )
            return [(x["stage"], x["step"], x["ids"]) for x in map(json.loads, lines)]

        assert steps("cut") == steps("ref")


def test_resume_at_another_world_size_through_a_universal_checkpoint(tmp_path, cache):
    import subprocess
    import sys

    common = dict(cache_dir=cache, train={"checkpoint_every": 2})
    ref = write_tiny_run(tmp_path / "ref", **common)
    train(ref)
    cut = write_tiny_run(tmp_path / "cut", **common)
    assert train(cut, env={"CLTK_KILL_AT": "0:3"}, check=False).returncode != 0
    # 2 ranks x accumulation 2 -> 1 rank x accumulation 4: the same global batch and data order
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "cltk",
            "train",
            "--config",
            str(cut),
            "--resume",
            "--set",
            "train.gradient_accumulation_steps=4",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert one.returncode == 0, one.stderr[-4000:]
    assert "s00-step000002-universal" in one.stderr
    a, b = report(ref), report(cut)
    for ra, rb in zip(a["perplexity"], b["perplexity"]):
        assert ra == pytest.approx(rb, rel=1e-3)
