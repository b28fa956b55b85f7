"""Joint training (``train.joint``), the bound continual methods are measured against: one stage that
mixes every trained domain in proportion to the steps its own stage would take, as many steps in all,
on the same held-out sequences, and a report that reads every domain as trained by that stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cltk.config import ConfigError
from cltk.metrics import forgetting_report, format_table
from cltk.metrics_files import load_report
from cltk.plan import plan_stages
from cltk.validate import load_config
from tests.tiny_run import ROOT, write_tiny_run

CODE = {"name": "code", "source": {"builtin": "stdlib"}, "max_chars": 40000}
BIBLE = {"name": "bible", "source": {"builtin": "kjv"}, "max_chars": 40000}
VERSE = {"name": "verse", "source": {"builtin": "shakespeare"}, "max_chars": 20000}
HELD = {"name": "held", "source": {"builtin": "licenses"}, "max_chars": 30000, "eval_only": True}


def test_a_joint_plan_is_one_stage_training_every_domain(tmp_path):
    cfg = load_config(write_tiny_run(tmp_path, domains=[CODE, HELD, BIBLE, VERSE],
                                     train={"joint": True}), world_size=1)
    (stage,) = plan_stages(cfg, {"code": 50, "held": 9, "bible": 40, "verse": 30})
    assert (stage.name, stage.domain, stage.domain_index, len(stage.indices)) == ("joint", "code", 0, 50)
    assert stage.joint == ((2, "bible"), (3, "verse")) and stage.trains == ["code", "bible", "verse"]
    assert [s.name for s in plan_stages(load_config(write_tiny_run(tmp_path, domains=[CODE, BIBLE]),
                                                    world_size=1), {"code": 5, "bible": 5})] == [
        "code", "bible"]


def test_joint_training_runs_no_method(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write_tiny_run(tmp_path, train={"joint": True}, replay={"share": 0.2}),
                    world_size=1)
    assert e.value.key == "train.joint" and "replay is on" in str(e.value)


def test_the_report_of_a_joint_stage_counts_every_domain_as_trained():
    rep = forgetting_report([[10.0, 20.0, 30.0]], ["joint"], ["a", "b", "held"], [["a", "b"]],
                            start=[50.0, 60.0, 25.0])
    assert rep.average_final_perplexity == 15.0 and rep.plasticity == {"a": 10.0, "b": 20.0}
    assert rep.mean_forgetting is None and rep.eval_only_domains == ["held"]
    assert rep.forgetting == {"held": 5.0} and rep.gain == {"a": 40.0, "b": 40.0}
    assert "joint        a+b" in format_table(rep)
    with pytest.raises(ValueError, match="not in domain_names: \\['c'\\]"):
        forgetting_report([[1.0, 1.0, 1.0]], ["joint"], ["a", "b", "held"], [["a", "c"]])


def test_a_joint_run_mixes_every_domain_by_its_steps_on_the_sequential_held_out_sets(tmp_path):
    """code, bible and verse would each take 3 steps of 6 sequences: the joint stage takes 9 steps,
    every step 2 sequences of each domain, and the held-out sets are those of the sequential run (the
    eval cache entries are shared)."""
    cache = tmp_path / "cache"
    seq = write_tiny_run(tmp_path / "seq", cache_dir=cache, domains=[CODE, HELD, BIBLE, VERSE],
                         train={"max_steps_per_stage": 3, "micro_batch_size": 3}, eval={"start": False})
    joint = write_tiny_run(tmp_path / "joint", cache_dir=cache, domains=[CODE, HELD, BIBLE, VERSE],
                           train={"max_steps_per_stage": 3, "micro_batch_size": 3, "joint": True,
                                  "log_sequence_ids": True},
                           eval={"start": False})
    cfg = load_config(joint, world_size=1)
    from cltk.data.prepare import prepare

    _, domains = prepare(cfg)
    sizes = {n: len(d.train) for n, d in domains.items()}
    own = {n: min(3, int(np.ceil(sizes[n] / 6))) for n in ("code", "bible", "verse")}
    assert list(own.values()) == [3, 3, 3]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "cltk", "train", "--config", str(joint)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "joint" / "out"
    steps = [json.loads(x)["ids"] for x in (out / "sequence_ids" / "rank0.jsonl").read_text().splitlines()]
    assert len(steps) == sum(own.values())
    counts = np.array([[sum(1 for d, _ in ids if d == di) for di in (0, 2, 3)] for ids in steps])
    assert (counts == 2).all(), counts
    rep = load_report(out)
    assert rep.stage_names == ["joint"] and rep.stage_domains == [["code", "bible", "verse"]]
    assert set(rep.plasticity) == {"code", "bible", "verse"} and rep.eval_only_domains == ["held"]
    plan = json.loads((out / "plan.json").read_text())["stages"]
    assert plan[0]["name"] == "joint" and plan[0]["joint"] == ["bible", "verse"]
    # the held-out sets are the sequential run's: same cache entries, nothing trained from them
    seq_cfg = load_config(seq, world_size=1)
    _, seq_domains = prepare(seq_cfg)
    for name in domains:
        assert (np.asarray(seq_domains[name].eval["input_ids"])
                == np.asarray(domains[name].eval["input_ids"])).all()
    assert "stage 00-joint: mixing" in proc.stderr
    # `cltk eval` over the saved stage reads the joint stage the same way
    ev = subprocess.run([sys.executable, "-m", "cltk", "eval", "--config", str(joint), "--no-start"],
                        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ev.returncode == 0, ev.stderr[-3000:]
    assert "00-joint     code+bible+verse" in ev.stdout, ev.stdout
    # the stage records each rank's peak memory (host RSS of a real process: tens of MiB at least)
    (peak,) = json.loads((out / "stages" / "00-joint" / "stage.json").read_text())["peak_memory_mb"]
    assert 50 < peak["rss"] < 20000 and "device" not in peak
