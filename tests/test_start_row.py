"""Row 0 of the forgetting matrix (the starting model) and a run that grows, on one tiny real story.

A tiny model is trained (``eval.start: false``: no row 0), then continued from its export through
``model.init_from`` with its first domain evaluation-only, killed mid-stage and resumed; the finished run
is then grown by appending a domain (a reordered config is refused first), and so is the first run (its
tokenizer trained on its corpora). Every figure is checked
against perplexities computed here with plain torch on the exported models and the same held-out
sequences.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from tests.multirank import run_ranks
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.multirank

CODE = {"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 40000}
BIBLE = {"name": "bible", "source": {"builtin": "kjv"}, "max_chars": 40000}
VERSE = {"name": "verse", "source": {"builtin": "shakespeare"}, "max_chars": 40000}
STEPS = {"max_steps_per_stage": 4, "checkpoint_every": 2}


def cltk(*args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cltk", *args], env=full, capture_output=True, text=True, timeout=900
    )


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:] + proc.stdout[-2000:]
    return proc


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def with_domains(cfg: Path, name: str, domains: list[dict]) -> Path:
    """A copy of ``cfg`` (same directory, so the same output_dir) with other domains."""
    raw = yaml.safe_load(cfg.read_text())
    raw["domains"] = domains
    path = cfg.parent / name
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def story(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("start_row")
    cache = root / "cache"
    first = write_tiny_run(root / "first", cache_dir=cache, train=STEPS, eval={"start": False})
    first_run = ok(cltk("train", "--config", str(first)))
    init = root / "first" / "out" / "stages" / "01-bible"
    cont = write_tiny_run(
        root / "cont",
        cache_dir=cache,
        train=STEPS,
        model={"init_from": str(init)},
        tokenizer={},
        domains=[{**CODE, "eval_only": True}, BIBLE],
    )
    out = root / "cont" / "out"
    killed = cltk("train", "--config", str(cont), env={"CLTK_KILL_AT": "0:2"})
    start_bytes, start_mtime = (
        (out / "start.json").read_bytes(),
        (out / "start.json").stat().st_mtime_ns,
    )
    resumed = ok(cltk("train", "--config", str(cont), "--resume"))
    before = {
        "report": read(out / "forgetting.json"),
        "config": (out / "config.yaml").read_bytes(),
        "csv": list(csv.reader((out / "forgetting.csv").open())),
        "start": (out / "start.json").read_bytes(),
        "start_mtime": (out / "start.json").stat().st_mtime_ns,
    }
    evals = {
        "default": ok(cltk("eval", "--config", str(cont), "--out", str(root / "eval"))),
        "none": ok(
            cltk("eval", "--config", str(cont), "--no-start", "--out", str(root / "eval-none"))
        ),
    }
    reordered = with_domains(cont, "reordered.yaml", [BIBLE, {**CODE, "eval_only": True}, VERSE])
    refused = cltk("train", "--config", str(reordered), "--resume")
    config_after_refusal = (out / "config.yaml").read_bytes()
    grown_cfg = with_domains(cont, "grown.yaml", [{**CODE, "eval_only": True}, BIBLE, VERSE])
    grown = ok(cltk("train", "--config", str(grown_cfg), "--resume"))
    # the first run (a tokenizer trained on its corpora, no row 0) grows too
    first_out = root / "first" / "out"
    first_before = {
        "report": read(first_out / "forgetting.json"),
        "tokenizer": (first_out / "tokenizer" / "tokenizer.json").read_bytes(),
    }
    first_grown = ok(
        cltk(
            "train",
            "--resume",
            "--config",
            str(with_domains(first, "grown.yaml", [CODE, BIBLE, VERSE])),
        )
    )
    return SimpleNamespace(
        first=first,
        first_run=first_run,
        init=init,
        cont=cont,
        out=out,
        killed=killed,
        start_bytes=start_bytes,
        start_mtime=start_mtime,
        resumed=resumed,
        before=before,
        refused=refused,
        config_after_refusal=config_after_refusal,
        grown_cfg=grown_cfg,
        grown=grown,
        evals=evals,
        root=root,
        first_before=first_before,
        first_grown=first_grown,
    )


def held_out(cfg: Path) -> dict[str, np.ndarray]:
    """The run's held-out sequences per domain, as the run packed them."""
    from cltk.data.prepare import prepare
    from cltk.validate import load_config

    _, domains = prepare(load_config(cfg))
    return {n: np.asarray(d.eval["input_ids"], dtype=np.int64) for n, d in domains.items()}


@torch.no_grad()
def plain_perplexity(model_dir: Path, ids: np.ndarray) -> float:
    """exp(mean next-token NLL) over every held-out token, with plain torch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    x = torch.as_tensor(ids)
    logits = model(input_ids=x).logits[:, :-1].float()
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
    return math.exp(float(nll))


def test_a_run_with_eval_start_false_has_no_row0(story):
    first_out = story.first.parent / "out"
    assert not (first_out / "start.json").exists()
    assert read(first_out / "forgetting.json")["start"] is None
    assert "start:" not in story.first_run.stderr and "learned (" not in story.first_run.stdout


def test_row0_is_the_starting_model_on_the_same_held_out_sequences(story):
    ids = held_out(story.cont)
    start = story.before["report"]["start"]
    expected = [plain_perplexity(story.init, ids[d]) for d in ("code", "bible")]
    assert start == pytest.approx(expected, rel=1e-4)
    # the same model scored by the first run after its last stage gives the same row
    assert start == pytest.approx(story.first_before["report"]["perplexity"][-1], rel=1e-6)
    rows = story.before["csv"]
    assert rows[0] == ["stage", "trains", "code", "bible"]
    assert rows[1][:2] == ["start", ""] and [float(v) for v in rows[1][2:]] == start
    table = story.resumed.stdout
    lines = table.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("after stage"))
    assert lines[header + 2].split()[:2] == ["start", "(before)"]
    assert "lost (evaluation-only domains, start -> final): perplexity" in table
    assert "learned (trained domains, start -> after own stage): perplexity" in table


def test_forgetting_of_an_eval_only_domain_is_final_minus_start(story):
    ids = held_out(story.cont)
    final_dir = story.out / "stages" / "00-bible"
    start = {d: plain_perplexity(story.init, ids[d]) for d in ("code", "bible")}
    final = {d: plain_perplexity(final_dir, ids[d]) for d in ("code", "bible")}
    r = story.before["report"]
    assert math.isfinite(r["forgetting"]["code"])
    assert r["forgetting"]["code"] == pytest.approx(final["code"] - start["code"], rel=1e-3)
    assert r["relative_forgetting"]["code"] == pytest.approx(
        final["code"] / start["code"] - 1, rel=1e-3
    )
    assert r["mean_start_forgetting"] == pytest.approx(r["forgetting"]["code"])
    assert r["mean_forgetting"] is None  # the only trained domain is the last stage's
    # the trained domain learnt: its gain over the start is start - perplexity after its stage
    assert r["gain"]["bible"] == pytest.approx(start["bible"] - final["bible"], rel=1e-3)
    assert r["gain"]["bible"] > 0


def test_resume_does_not_evaluate_row0_twice(story):
    assert story.killed.returncode != 0
    assert story.killed.stderr.count("start: evaluating the starting model") == 1
    assert "start: evaluating" not in story.resumed.stderr
    assert "start: row 0 read from" in story.resumed.stderr
    assert story.before["start"] == story.start_bytes
    assert story.before["start_mtime"] == story.start_mtime  # not rewritten by the resume
    # the grown run scored the starting model on the appended domain only
    assert "start: evaluating the starting model (init_from) on verse\n" in story.grown.stderr
    record = read(story.out / "start.json")
    first = json.loads(story.start_bytes)
    assert {d: record["perplexity"][d] for d in ("code", "bible")} == first["perplexity"]


def test_a_reordered_config_is_refused_before_any_work(story):
    assert story.refused.returncode != 0
    err = story.refused.stderr
    assert "domains[0] was 'code' and is now 'bible'" in err and "order" in err
    assert "start:" not in err  # refused before preparing or evaluating anything
    assert story.config_after_refusal == story.before["config"]  # nothing was rewritten


def test_cltk_eval_scores_the_starting_model_as_row0_unless_told_not_to(story):
    run = story.before["report"]
    evaluated = read(story.root / "eval" / "forgetting.json")
    assert evaluated["start"] == pytest.approx(run["start"], rel=1e-4)
    assert evaluated["perplexity"][0] == pytest.approx(run["perplexity"][0], rel=1e-4)
    assert evaluated["forgetting"]["code"] == pytest.approx(run["forgetting"]["code"], rel=1e-3)
    assert "lost (evaluation-only domains" in story.evals["default"].stdout
    skipped = read(story.root / "eval-none" / "forgetting.json")
    assert skipped["start"] is None and skipped["forgetting"] == {}
    assert skipped["perplexity"][0] == pytest.approx(run["perplexity"][0], rel=1e-4)


def test_a_finished_run_grows_with_an_appended_domain(story):
    r = read(story.out / "forgetting.json")
    assert r["domain_names"] == ["code", "bible", "verse"]
    assert r["stage_names"] == ["bible", "verse"] and len(r["perplexity"]) == 2
    # the earlier row and row 0 keep their values and gain the new column, measured on the
    # earlier export and the starting model
    ids = held_out(story.grown_cfg)
    old = story.before["report"]
    assert r["perplexity"][0][:2] == old["perplexity"][0]
    assert r["start"][:2] == old["start"]
    assert r["perplexity"][0][2] == pytest.approx(
        plain_perplexity(story.out / "stages" / "00-bible", ids["verse"]), rel=1e-4
    )
    assert r["start"][2] == pytest.approx(plain_perplexity(story.init, ids["verse"]), rel=1e-4)
    stage0 = read(story.out / "stages" / "00-bible" / "stage.json")
    assert stage0["perplexity"]["verse"] == r["perplexity"][0][2]  # recorded: scored once
    assert "grow: scoring stage 00-bible's export on verse" in story.grown.stderr
    assert "stage 00-bible: already complete" in story.grown.stderr
    # the new stage trained the new domain, from the earlier stage's export
    plan = read(story.out / "plan.json")["stages"]
    assert [s["name"] for s in plan] == ["bible", "verse"]
    assert r["perplexity"][1][2] < r["perplexity"][0][2]
    assert r["forward_transfer"]["verse"] == pytest.approx(r["start"][2] - r["perplexity"][0][2])
    assert (story.out / "stages" / "01-verse" / "model.safetensors").is_file()


def test_zero3_two_ranks_score_row0_like_one_process(story, tmp_path):
    """Row 0 under ZeRO 3 (the starting model partitioned over 2 ranks) equals the 1-process row."""
    cfg = write_tiny_run(
        tmp_path,
        zero_stage=3,
        cache_dir=story.first.parent.parent / "cache",
        train={"max_steps_per_stage": 1},
        model={"init_from": str(story.init)},
        tokenizer={},
        domains=[{**CODE, "eval_only": True}, BIBLE],
    )
    run_ranks(["cltk", "train", "--config", str(cfg)], module=True, timeout=600)
    record = read(tmp_path / "out" / "start.json")
    assert record["world_size"] == 2
    assert [record["perplexity"][d] for d in ("code", "bible")] == pytest.approx(
        story.before["report"]["start"], rel=1e-5
    )


def test_a_run_with_a_trained_tokenizer_grows_keeping_it(story):
    out = story.first.parent / "out"
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == story.first_before["tokenizer"]
    r, old = read(out / "forgetting.json"), story.first_before["report"]
    assert r["stage_names"] == ["code", "bible", "verse"] and r["start"] is None
    ids = held_out(story.first.parent / "grown.yaml")
    for i, stage in enumerate(("00-code", "01-bible")):  # both earlier rows gain the new column
        assert r["perplexity"][i][:2] == old["perplexity"][i]
        assert r["perplexity"][i][2] == pytest.approx(
            plain_perplexity(out / "stages" / stage, ids["verse"]), rel=1e-4
        )
    # the new stage started from the last finished stage's export: it learnt verse from there
    assert r["perplexity"][2][2] < r["perplexity"][1][2]
    assert r["forgetting"]["bible"] == pytest.approx(r["perplexity"][2][1] - r["perplexity"][1][1])
