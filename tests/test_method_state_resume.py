"""EWC, SPG and A-GEM through the whole loop on 2 ranks (ZeRO 2), in one shared run, and their state (EWC's
and SPG's tensors laid out like each rank's ZeRO partitions, saved as ``methods_rank<r>.pt``; A-GEM's memory
and counts as JSON) surviving a kill: SIGKILLed mid-stage inside their gradient windows and resumed, a run
ends where the uninterrupted one ends.

The uninterrupted run also shows each method doing its job: EWC's penalty is logged and added to the loss
from the second stage on; SPG's importance accumulates by element-wise max and the second stage moves the
elements the first found important far less than the free ones."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.multirank import train_killed, train_ranks
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.multirank

# 6 steps per stage; both windows cover steps 2-5; a checkpoint after step 4, the kill after step 5
SECTIONS = dict(
    train={"checkpoint_every": 4, "lr": 1e-2},
    eval={"start": False},
    ewc={"lam": 1000.0, "gamma": 0.5, "fisher_steps": 4},
    spg={"importance_steps": 4},
    agem={"memory": 16, "batch": 2},
)


def _tensors(out: Path, stage: str, rank: int) -> dict:
    return torch.load(out / "stages" / stage / f"methods_rank{rank}.pt", weights_only=True)


def test_ewc_and_spg_state_resumes_after_a_kill_inside_their_windows(tmp_path):
    cache = tmp_path / "cache"
    ref = write_tiny_run(tmp_path / "ref", cache_dir=cache, **SECTIONS)
    run = train_ranks(ref)
    check_ewc(ref.parent / "out", run.stdout + run.stderr)
    check_spg(ref.parent / "out")
    cut = write_tiny_run(tmp_path / "cut", cache_dir=cache, **SECTIONS)
    _, latest = train_killed(cut, "1:5")
    assert latest == "s01-step000004"
    out_ref, out_cut = ref.parent / "out", cut.parent / "out"
    # the checkpoint holds each rank's state, in the middle of both windows
    for r in (0, 1):
        mid = torch.load(out_cut / "checkpoints" / latest / f"methods_rank{r}.pt", weights_only=True)
        assert {"ewc", "spg"} <= set(mid)
        assert any(k.startswith("square_sum") for k in mid["ewc"])
    train_ranks(cut, "--resume")
    a = json.loads((out_ref / "forgetting.json").read_text())["perplexity"]
    b = json.loads((out_cut / "forgetting.json").read_text())["perplexity"]
    for ra, rb in zip(a, b):
        assert ra == pytest.approx(rb, rel=1e-6, abs=1e-6)
    last = sorted(p.name for p in (out_ref / "stages").iterdir())[-1]
    agem = [json.loads((o / "stages" / last / "stage.json").read_text())["methods"]["agem"] for o in
            (out_ref, out_cut)]
    assert agem[0] == agem[1]  # the same memory, and every step took its reference gradient once
    assert agem[0]["counts"]["bible"]["reference_steps"] == 6
    assert [len(m["sequences"]) for m in agem[0]["memory"]] == [16, 16]
    for r in (0, 1):
        ta, tb = _tensors(out_ref, last, r), _tensors(out_cut, last, r)
        assert set(ta) == set(tb) == {"ewc", "spg"}
        for method in ta:
            assert set(ta[method]) == set(tb[method])
            for name, t in ta[method].items():
                torch.testing.assert_close(tb[method][name], t, rtol=1e-6, atol=1e-7, msg=name)
    # the ranks hold different halves: nothing is a full copy per rank
    a0, a1 = _tensors(out_ref, last, 0)["ewc"], _tensors(out_ref, last, 1)["ewc"]
    assert not torch.equal(a0["anchor.0"], a1["anchor.0"])


def check_ewc(out: Path, log: str) -> None:
    first, second = sorted((out / "stages").iterdir())
    for r in (0, 1):
        saved = _tensors(out, first.name, r)["ewc"]
        assert {"fisher.0", "anchor.0", "layout"} <= set(saved) and "square_sum.0" not in saved
        fishers = [v for k, v in saved.items() if k.startswith("fisher")]
        assert all(float(f.min()) >= 0 for f in fishers) and any(float(f.max()) > 0 for f in fishers)
    for d, stages in ((first, 1), (second, 2)):
        assert json.loads((d / "stage.json").read_text())["methods"]["ewc"]["stages"] == stages
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    extra = [(int(r["stage"]), json.loads(r["extra"]) if r["extra"] else {}, r) for r in rows]
    assert all("ewc_penalty" not in e for s, e, _ in extra if s == 0)
    later = [(e["ewc_penalty"], r) for s, e, r in extra if s == 1]
    # stage 2 starts at the anchor (stage 1's final weights), then moves away from it
    assert len(later) == 6 and later[0][0] == pytest.approx(0, abs=1e-9)
    assert all(p > 0 for p, _ in later[1:])
    for p, r in later:  # the reported loss is the main loss plus the penalty
        assert float(r["loss"]) == pytest.approx(float(r["loss_main"]) + p, rel=1e-4)
    assert "ewc: penalty on, lam 1000" in log and "Fisher of 2 stage(s)" in log


def check_spg(out: Path) -> None:
    from transformers import AutoModelForCausalLM

    from cltk.methods.spg.sharded import load_full_importance

    stages = sorted((out / "stages").iterdir())
    imp0, imp1 = load_full_importance(stages[0]), load_full_importance(stages[1])
    before = AutoModelForCausalLM.from_pretrained(str(stages[0]))
    after = dict(AutoModelForCausalLM.from_pretrained(str(stages[1])).named_parameters())
    params = dict(before.named_parameters())
    assert imp0.keys() == imp1.keys() == params.keys()
    for name, p in params.items():
        assert imp0[name].numel() == p.numel()
        assert 0 <= float(imp0[name].min()) and float(imp1[name].max()) <= 1
        assert bool((imp1[name] >= imp0[name]).all())  # accumulated by element-wise max
    assert any(not torch.equal(imp1[n], imp0[n]) for n in params)  # the second domain added some
    moved: dict[str, list] = {"important": [], "free": []}
    for name, p in params.items():
        d = (after[name] - p).detach().abs().flatten()
        moved["important"].append(d[imp0[name] > 0.95])
        moved["free"].append(d[imp0[name] < 0.05])
    important, free = torch.cat(moved["important"]).mean(), torch.cat(moved["free"]).mean()
    assert important < 0.15 * free, (important, free)
