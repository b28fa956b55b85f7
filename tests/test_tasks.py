"""Downstream tasks through lm-eval (eval.tasks): one tiny real run, checked against lm-eval itself.

A tiny model is trained over two real domains with the shipped ``kjv_cloze`` task (limit 20), killed in
its second stage and resumed. The accuracy cltk recorded for each stage must equal what
``lm_eval.simple_evaluate`` gives on that stage's export (same task, limit and batch size); the resume must
read row 0 rather than score it again; ``cltk eval --tasks`` over the finished run must give the same
figures; 2 ranks (in the shared 2-rank launch, on a tiny Llama of their own) must give lm-eval's
figures, each request scored on one rank only, and under ZeRO 3 with each rank holding its partition
only. Bad inputs stop before any work with one line and exit 2.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cltk.task_report import task_report
from tests.kit import tiny_llama
from tests.tiny_run import ROOT, write_tiny_run

lm_eval = pytest.importorskip("lm_eval")

TASKS = ROOT / "tasks"
LIMIT = 20
EVAL = {"tasks": ["kjv_cloze"], "include_path": [str(TASKS)], "limit": LIMIT, "task_batch_size": 4}


def cltk(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "cltk", *args], env=full, capture_output=True,
                          text=True, timeout=900)


def lm_eval_on(model_dir: Path, limit: int = LIMIT) -> dict:
    """What lm-eval itself says of a saved model (its hf model, its task manager)."""
    from lm_eval.tasks import TaskManager

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},device=cpu", tasks=["kjv_cloze"],
        task_manager=TaskManager(include_path=str(TASKS), include_defaults=False), limit=limit,
        batch_size=4)
    return out["results"]["kjv_cloze"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-stage run, killed once in stage 1 and resumed: (config, first log, resumed log)."""
    root = tmp_path_factory.mktemp("tasks")
    cfg = write_tiny_run(root, eval=EVAL, train={"max_steps_per_stage": 4, "checkpoint_every": 2})
    first = cltk("train", "--config", str(cfg), env={"CLTK_KILL_AT": "1:3"})
    assert first.returncode != 0, "the run should have been killed in stage 1"
    second = cltk("train", "--config", str(cfg), "--resume")
    assert second.returncode == 0, second.stderr[-4000:]
    return cfg, first.stderr + first.stdout, second.stderr + second.stdout


def test_recorded_accuracy_equals_lm_eval_on_the_export(run):
    cfg, _, _ = run
    out = cfg.parent / "out"
    report = json.loads((out / "forgetting.json").read_text())["tasks"]
    assert report["tasks"] == ["kjv_cloze"] and report["metrics"] == ["acc"]
    stages = sorted((out / "stages").iterdir())
    assert len(stages) == len(report["scores"]) == 2
    for k, stage in enumerate(stages):
        ref = lm_eval_on(stage)
        recorded = json.loads((stage / "stage.json").read_text())["tasks"]["kjv_cloze"]
        assert recorded["value"] == ref["acc,none"] == report["scores"][k][0]
        assert recorded["stderr"] == pytest.approx(ref["acc_stderr,none"], rel=1e-12)
        assert recorded["samples"] == LIMIT
        kept = json.loads((stage / "lm_eval.json").read_text())  # lm-eval's own output, per stage
        assert kept["results"]["kjv_cloze"]["acc,none"] == ref["acc,none"]
        assert kept["results"]["kjv_cloze"]["acc_norm,none"] == ref["acc_norm,none"]
    start = json.loads((out / "start.json").read_text())["tasks"]["kjv_cloze"]["value"]
    assert report["start"] == [start]
    final = report["scores"][-1][0]
    assert report["lost"]["kjv_cloze"] == pytest.approx(start - final)  # higher is better: start - final
    rows = list(csv.reader((out / "forgetting.csv").open()))
    assert rows[0][-2:] == ["kjv_cloze (acc)", "kjv_cloze (acc_stderr)"]
    assert [float(r[-2]) for r in rows[1:]] == [start, *(r[0] for r in report["scores"])]


def test_resume_reads_row_0_and_finished_stages(run):
    _, first, second = run
    assert "start: tasks kjv_cloze" in first  # row 0 scored once, in the first launch
    assert "start: tasks" not in second and "start: row 0 read from" in second
    assert "stage 00-code: tasks" not in second  # the finished stage's scores are read, not re-scored
    assert "stage 01-bible: tasks kjv_cloze" in second
    table = second[second.index("downstream tasks (lm-eval"):]
    assert "kjv_cloze (acc)" in table and "lost (start -> final)" in table


def test_cltk_eval_with_tasks_gives_the_run_figures(run, tmp_path):
    cfg, _, _ = run
    proc = cltk("eval", "--config", str(cfg), "--out", str(tmp_path), "--tasks", "kjv_cloze",
                "--include-path", str(TASKS), "--limit", str(LIMIT), "--set", "eval.task_batch_size=4")
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = json.loads((tmp_path / "forgetting.json").read_text())["tasks"]
    want = json.loads((cfg.parent / "out" / "forgetting.json").read_text())["tasks"]
    assert got["scores"] == want["scores"] and got["start"] == want["start"]
    assert (tmp_path / "stages" / "01-bible" / "lm_eval.json").is_file()


# ----- two ranks: each request scored on one rank, the figures of one rank ------------------------
# Rank 0 saves a tiny Llama with a tokenizer trained like the tiny run's (the KJV, vocabulary 400);
# both ranks then score it through cltk.tasks.evaluate_tasks twice, in the same processes:
# - ``plain``: a full copy of the model per rank (as ``cltk eval`` and ZeRO 0/1/2 stages score), limit
#   20: an even split, so lm-eval adds no padding request and every request must be scored once;
# - ``zero3``: the model partitioned by a ZeRO-3 engine without optimizer (as row 0 and a ZeRO-3 stage
#   are scored), limit 21: an uneven split, so the ranks run different numbers of forwards and cltk's
#   lockstep must even them out (else the ranks hang on the parameter gathers). Before each forward
#   each rank records the share of the model it holds and the share it has gathered in full.
# The test scores the saved model with lm-eval itself, in its own process, and removes it.
def _settings(limit: int):
    from cltk import tasks

    return tasks.TaskSettings(("kjv_cloze",), (str(TASKS),), limit, None, 4)


def _save_tiny_model(out: Path) -> None:
    from cltk.data.corpora import load_documents
    from cltk.data.tokenizer import train_tokenizer

    texts = load_documents({"builtin": "kjv"}, max_chars=40000, seed=0, domain="bible")
    tiny_llama(0, vocab_size=len(train_tokenizer(texts, 400, out))).save_pretrained(out)


def _score_zero3(model_dir: str, tokenizer, lms: list) -> dict:
    """The ``zero3`` run: its scores and requests, and the largest shares of the model this rank
    held (its partition) and had gathered in full before a forward."""
    import deepspeed
    from transformers import AutoModelForCausalLM

    from cltk import tasks

    held: list[tuple[float, float]] = []
    model = AutoModelForCausalLM.from_pretrained(model_dir).requires_grad_(False)
    engine, *_ = deepspeed.initialize(model=model, config={
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})

    def measure(module, *_):
        params = list(module.parameters())
        total = sum(p.ds_numel for p in params)
        held.append((sum(p.ds_tensor.numel() for p in params) / total,
                     sum(p.numel() for p in params) / total))

    engine.module.register_forward_pre_hook(measure)
    try:
        zero3 = engine.zero_optimization_stage() == 3
        scores = tasks.evaluate_tasks(engine.module, tokenizer, _settings(21), zero3=zero3)
        return {"scores": scores, "requests": lms[-1].requests, "forwards": lms[-1].forwards,
                "partition": max(h[0] for h in held), "gathered": max(h[1] for h in held),
                "zero_stage": engine.zero_optimization_stage()}
    finally:
        engine.destroy()


def tasks_on_two_ranks() -> dict:
    """Rank 0's: ``dir``, the model scored (the caller removes it), and ``ranks``, every rank's
    account per run: the scores, the requests it scored (task, doc, choice), its forward count."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cltk import distributed as dist
    from cltk import tasks

    made = tempfile.mkdtemp(prefix="task_ranks") if dist.is_main() else None
    make_lm, lms = tasks.make_lm, []
    try:
        if made is not None:
            _save_tiny_model(Path(made))
        model_dir = dist.broadcast_object(made)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        tasks.make_lm = lambda *a, **k: lms.append(make_lm(*a, **k)) or lms[-1]  # to read the LM
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        scores = tasks.evaluate_tasks(model, tokenizer, _settings(20))
        out = {"plain": {"scores": scores, "requests": lms[-1].requests,
                         "forwards": lms[-1].forwards},
               "zero3": _score_zero3(model_dir, tokenizer, lms)}
        return {"dir": made, "ranks": dist.all_gather_object(out)}
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        raise
    finally:
        tasks.make_lm = make_lm


@pytest.mark.multirank
@pytest.mark.on_two_ranks("tasks_on_two_ranks")
def test_two_ranks_score_each_request_once_and_as_one_rank(on_two_ranks):
    ranks = on_two_ranks["ranks"]
    try:
        refs = {name: lm_eval_on(Path(on_two_ranks["dir"]), limit)
                for name, limit in (("plain", 20), ("zero3", 21))}
    finally:
        shutil.rmtree(on_two_ranks["dir"])
    print({n: [(len(r[n]["requests"]), r[n]["forwards"], r[n].get("partition"), r[n].get("gathered"))
               for r in ranks] for n in ("plain", "zero3")})  # requests, forwards, shares held
    for name, limit in (("plain", 20), ("zero3", 21)):
        for r in ranks:  # every rank returns rank 0's figures, which are lm-eval's
            assert r[name]["scores"]["kjv_cloze"]["value"] == refs[name]["acc,none"]
            assert r[name]["scores"]["kjv_cloze"]["samples"] == limit
    seen = [tuple(x) for r in ranks for x in r["plain"]["requests"]]
    assert len(seen) == len(set(seen)) == LIMIT * 4  # 4 choices a document, each scored once
    assert {d for _, d, _ in seen} == set(range(LIMIT))
    docs = [{d for _, d, _ in r["plain"]["requests"]} for r in ranks]
    assert docs[0].isdisjoint(docs[1]) and docs[0] and docs[1]
    z = [r["zero3"] for r in ranks]
    assert all(x["zero_stage"] == 3 for x in z)
    assert z[0]["forwards"] == z[1]["forwards"]  # ZeRO 3: ranks ran forwards in lockstep
    # each rank holds its half of the model, and between forwards nothing is gathered in full
    assert all(0.45 < x["partition"] <= 0.51 and x["gathered"] < 0.5 for x in z), z


def test_task_figures_are_signed_for_the_metric_direction():
    acc = lambda v: {"kjv": {"metric": "acc", "value": v, "stderr": 0.1}}  # noqa: E731
    r = task_report([acc(0.7), acc(0.5)], start=acc(0.6))
    assert r.lost["kjv"] == pytest.approx(0.1)  # 0.6 -> 0.5: lost 0.1 (positive is bad)
    assert r.forgetting["kjv"] == pytest.approx(0.2)  # best 0.7 -> 0.5
    assert r.gain["kjv"] == pytest.approx(0.1)  # best stage 0.7 over start 0.6
    ppl = lambda v: {"lam": {"metric": "perplexity", "value": v, "higher_is_better": False}}  # noqa
    r = task_report([ppl(20.0), ppl(30.0)], start=ppl(25.0))
    assert r.lost["lam"] == pytest.approx(5.0) and r.forgetting["lam"] == pytest.approx(10.0)
    assert r.gain["lam"] == pytest.approx(5.0) and r.higher_is_better == [False]
    missing = task_report([{}, acc(0.5)])
    assert math.isnan(missing.scores[0][0]) and "kjv" not in missing.forgetting


def _train_exit(tmp_path, capsys, **eval_keys) -> tuple[int, str]:
    from cltk.cli import main

    cfg = write_tiny_run(tmp_path, eval=eval_keys)
    code = main(["train", "--config", str(cfg)])
    err = capsys.readouterr().err.strip()
    assert not (tmp_path / "out").exists(), "the run started before the mistake was found"
    return code, err


@pytest.mark.parametrize("keys, message", [
    ({"tasks": ["kjv_clozee"], "include_path": [str(TASKS)]},
     "eval.tasks: unknown lm-eval task 'kjv_clozee'; did you mean 'kjv_cloze'?"),
    ({"tasks": ["kjv_cloze"], "include_path": ["no/such/dir"]}, "is not a directory"),
    ({"include_path": [str(TASKS)]}, "eval.include_path: is set but eval.tasks is empty"),
    ({"tasks": ["kjv_cloze"], "include_path": [str(TASKS)], "limit": 0}, "eval.limit: must be > 0"),
])
def test_bad_task_settings_exit_2_before_any_work(tmp_path, capsys, keys, message):
    code, err = _train_exit(tmp_path, capsys, **keys)
    assert code == 2 and err.count("\n") == 0 and err.startswith("cltk: ") and message in err, err


def test_a_broken_task_yaml_is_named(tmp_path, capsys):
    own = tmp_path / "mytasks"
    own.mkdir()
    (own / "good.yaml").write_text((TASKS / "kjv_cloze" / "kjv_cloze.yaml").read_text()
                                   .replace("task: kjv_cloze", "task: mine"))
    (own / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    code, err = _train_exit(tmp_path / "run", capsys, tasks=["mine"], include_path=[str(own)])
    assert code == 2 and err.count("\n") == 0, err
    assert f"{own / 'broken.yaml'} is not a valid lm-eval task YAML" in err


def test_lm_eval_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    code, err = _train_exit(tmp_path, capsys, tasks=["kjv_cloze"], include_path=[str(TASKS)])
    assert code == 2 and err.count("\n") == 0 and "pip install -e '.[eval]'" in err, err


def test_the_bench_page_has_the_task_column(run, tmp_path):
    """The page of a finished run read as a bench arm: the summary column and the matrix's tasks."""
    from cltk.bench import page
    from cltk.bench.arms import TIERS
    from cltk.bench.run import read_arm

    cfg, _, _ = run
    arm = read_arm(cfg.parent / "out")
    rep = arm["report"]["tasks"]
    page.write_page({"naive": {1: arm}}, TIERS["real"], [1], "cltk bench", tmp_path / "b.md",
                    tmp_path / "figures")
    md = (tmp_path / "b.md").read_text()
    assert "lost of what it knew on tasks (kjv_cloze acc; points) |" in md
    assert f"| {100 * rep['mean_lost']:+.1f} |" in md
    start_row = md.split("### naive")[1].split("| start |")[1].splitlines()[0]
    assert start_row.rstrip().endswith(f"| {rep['start'][0]:.3f} |")
    assert "kjv_cloze (acc) |" in md.split("### naive")[1]
