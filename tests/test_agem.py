"""A-GEM: the projection against a hand computation and a plain reference, the memory's draws, the
config's refusals, a tiny `cltk train` run, and (real ranks) ZeRO 0-3 against plain torch A-GEM."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cltk.config import ConfigError
from cltk.methods.agem import AgemConfig
from cltk.methods.agem.memory import memory_batch, stage_sample
from cltk.methods.agem.projection import coefficient, local_dots, project_, project_reference
from cltk.validate import load_config
from tests.multirank import run_one, run_ranks
from tests.tiny_run import write_tiny_run

SCRIPT = Path(__file__).parent / "scripts" / "agem_zero.py"


# ----- the projection -----------------------------------------------------------------------------
def test_projection_matches_a_hand_computation():
    g, r = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, 1.0, 0.0])
    # g.r = -1, r.r = 2: g - (-1/2) r = [0.5, 0.5, 2]
    res = project_([g], [r])
    assert (res.dot, res.ref_sq, res.coef, res.projected) == (-1.0, 2.0, -0.5, True)
    torch.testing.assert_close(g, torch.tensor([0.5, 0.5, 2.0]))
    assert float(g @ r) == 0.0  # projected onto the boundary of the half-space g.r >= 0


def test_no_conflict_or_no_reference_leaves_g_alone():
    g = torch.tensor([1.0, 2.0])
    for r in (torch.tensor([1.0, -0.25]), torch.tensor([2.0, -1.0]), torch.zeros(2)):  # dot 0.5, 0, 0
        res = project_([g], [r])
        assert not res.projected and res.coef == 0.0
        torch.testing.assert_close(g, torch.tensor([1.0, 2.0]))
    with pytest.raises(FloatingPointError, match="non-finite"):
        coefficient(math.nan, 1.0)


def test_pieces_on_two_ranks_project_like_the_whole_vector():
    """Uneven pieces per 'rank', the dots summed over ranks as the all-reduce does == plain reference."""
    gen = torch.Generator().manual_seed(0)
    g, r = torch.randn(101, generator=gen), torch.randn(101, generator=gen)
    if g @ r > 0:  # make them conflict
        r = r - 2 * (g @ r) / (g @ g) * g
    assert g @ r < 0
    want = project_reference(g, r)
    cuts = {0: [(0, 7), (40, 101)], 1: [(7, 40)]}  # rank 0 holds two partitions, rank 1 one
    pieces = {k: ([g[a:b].clone() for a, b in v], [r[a:b] for a, b in v]) for k, v in cuts.items()}
    partial = {k: local_dots(*pieces[k]) for k in pieces}
    got = torch.empty_like(g)
    for k, other in ((0, 1), (1, 0)):
        res = project_(*pieces[k], reduce=lambda d, o=other: d + partial[o])
        assert res.coef == pytest.approx(float((g @ r) / (r @ r)), rel=1e-6)
        for (a, b), piece in zip(cuts[k], pieces[k][0]):
            got[a:b] = piece
    torch.testing.assert_close(got, want)
    assert abs(float(got @ r)) < 1e-4


# ----- the memory ---------------------------------------------------------------------------------
def test_memory_draws_are_seeded_disjoint_across_ranks_and_refuse_too_much():
    indices = np.arange(100, 160)
    a = stage_sample(7, 1, indices, 10)
    assert len(set(a)) == 10 and set(a) <= set(indices) and list(a) == sorted(a)
    assert np.array_equal(a, stage_sample(7, 1, indices, 10))
    assert not np.array_equal(a, stage_sample(7, 2, indices, 10))
    with pytest.raises(ValueError):
        stage_sample(7, 1, indices, 61)
    shares = [memory_batch(30, 7, 1, 5, r, 3, 4) for r in range(3)]
    assert len(set(np.concatenate(shares))) == 12  # disjoint while the memory holds a global batch
    assert np.array_equal(np.concatenate(shares), memory_batch(30, 7, 1, 5, 0, 1, 12))
    assert np.array_equal(shares[1], memory_batch(30, 7, 1, 5, 1, 3, 4))  # a resumed step: the same
    assert len(memory_batch(3, 7, 1, 5, 0, 2, 4)) == 4  # a small memory: drawn with replacement


def _ctx(stage: int, sizes: list[int]):
    stages = [SimpleNamespace(index=i, name=f"d{i}", domain=f"d{i}", dirname=f"0{i}-d{i}",
                              indices=np.arange(n)) for i, n in enumerate(sizes)]
    return SimpleNamespace(stage=stages[stage], stages=stages)


def test_memory_survives_a_json_round_trip_and_is_checked_against_the_data(tmp_path):
    from cltk.methods.agem.method import AgemMethod

    cfg = load_config(write_tiny_run(tmp_path, agem={"memory": 5}))
    m = AgemMethod(cfg, cfg.agem)
    assert m.mixes(_ctx(0, [5, 3])) == []  # the last stage is never recalled: its size is free
    with pytest.raises(ConfigError, match="agem.memory: 5 sequences per earlier stage, but stage d1"):
        m.mixes(_ctx(0, [9, 4, 9]))
    for i in range(2):
        m._remember(_ctx(i, [20, 30, 40]))
    m._remember(_ctx(1, [20, 30, 40]))  # a stage end that runs again after a resume: not twice
    state = json.loads(json.dumps(m.state_dict()))
    back = AgemMethod(cfg, cfg.agem)
    back.load_state_dict(state)
    assert back.memory == m.memory and [e["name"] for e in back.memory] == ["d0", "d1"]
    assert all(len(e["sequences"]) == 5 for e in back.memory)


# ----- the config ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("section", "ds", "key", "words"),
    [
        ({"memory": 0}, None, "agem.memory", "must be > 0"),
        ({"batch": 0}, None, "agem.batch", "must be > 0"),
        ({}, {"fp16": {"enabled": True}}, "deepspeed", "enables fp16"),
        ({}, {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
         "deepspeed", "offload_optimizer"),
        ({}, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "deepspeed",
         "BF16_Optimizer"),
        ({}, {"zero_optimization": {"stage": 1}, "bf16": {"enabled": True},
              "data_types": {"grad_accum_dtype": "fp32"}}, "deepspeed", "BF16_Optimizer"),
    ],
)
def test_bad_settings_are_refused_at_load_with_the_key(tmp_path, section, ds, key, words):
    path = write_tiny_run(tmp_path, agem=section)
    if ds is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert e.value.key == key and words in str(e.value)
    if key == "deepspeed":
        assert "agem" in str(e.value)


def test_an_engine_stepping_with_bf16_optimizer_is_refused_before_training(tmp_path):
    """bf16 "auto" at ZeRO 0 becomes DeepSpeed's BF16_Optimizer on a GPU: refused at engine build,
    in the first stage too."""
    from cltk.methods.agem.method import AgemMethod

    cfg = load_config(write_tiny_run(tmp_path, agem={}))
    bf16_opt = SimpleNamespace(bf16_groups=[[]], fp32_groups_flat_partition=[torch.zeros(4)],
                               optimizer=None)
    engine = SimpleNamespace(module=torch.nn.Linear(2, 2), optimizer=bf16_opt)
    ctx = SimpleNamespace(engine=engine, **vars(_ctx(0, [9, 9])))
    with pytest.raises(ConfigError, match="deepspeed: agem: .*BF16_Optimizer"):
        AgemMethod(cfg, cfg.agem).on_engine_ready(ctx)


def test_defaults_load_and_batch_follows_the_micro_batch(tmp_path):
    cfg = load_config(write_tiny_run(tmp_path, agem={}))
    assert isinstance(cfg.agem, AgemConfig) and cfg.agem.memory == 256
    assert cfg.agem.batch_size(cfg) == cfg.train.micro_batch_size == 2


# ----- a tiny run ---------------------------------------------------------------------------------
def test_tiny_run_projects_in_the_second_stage_only(tmp_path):
    """Two stages on one rank: the first trains plainly; the second keeps 8 of the first's sequences and
    takes a reference gradient on every step, projecting where they conflict (lr high enough that they
    do here)."""
    steps = 8
    cfg = write_tiny_run(
        tmp_path,
        agem={"memory": 8, "batch": 2},
        train={"lr": 3e-2, "max_steps_per_stage": steps},
        eval={"start": False, "heatmap": False},
    )
    proc = run_one(cfg, env={"PYTHONPATH": str(SCRIPT.parents[2])}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    first, second = sorted((tmp_path / "out" / "stages").iterdir())
    s0 = json.loads((first / "stage.json").read_text())["methods"]["agem"]
    s1 = json.loads((second / "stage.json").read_text())["methods"]["agem"]
    assert s0["counts"] == {}  # no memory in the first stage: plain training
    assert [e["name"] for e in s1["memory"]] == ["code", "bible"]
    code = s1["memory"][0]["sequences"]
    assert len(code) == 8 == len(set(code))
    counts = s1["counts"]["bible"]
    assert counts["reference_steps"] == steps and 1 <= counts["projected_steps"] <= steps
    assert (f"agem: stage 01-bible: projected {counts['projected_steps']} of {steps} steps"
            in proc.stderr)
    assert "memory of 8 sequences from 1 earlier stage(s)" in proc.stderr


# ----- real ranks ---------------------------------------------------------------------------------
@pytest.mark.multirank
def test_agem_projection_under_zero_matches_a_single_process_reference(tmp_path):
    out = tmp_path / "agem.json"
    run = run_ranks(
        [SCRIPT, "--out", out, "--runs", "0", "1", "2", "3", "2:bf16"],
        world_size=2,
        timeout=600,
        env={"PYTHONPATH": str(SCRIPT.parents[2])},
    )
    report = json.loads(out.read_text())
    assert report["world"] == 2, run.stdout[-3000:]
    layouts = {0: "plain", 1: "zero1/2", 2: "zero1/2", 3: "zero3"}
    assert [(r["stage"], r["bf16"]) for r in report["results"]] == [
        (0, False), (1, False), (2, False), (3, False), (2, True)]
    for r in report["results"]:
        assert r["layout"] == layouts[r["stage"]]
        for s in r["steps"]:
            print(f"ZeRO {r['stage']}{' bf16' if r['bf16'] else ''} step {s['step']}: grad err "
                  f"{s['grad_err']:.1e}, coef {s['coef']:.4f} (reference {s['ref_coef']:.4f}), "
                  f"weight err {s['weight_err']:.1e}")
            where = (r["stage"], r["bf16"], s)
            # step 0: g and g_ref agree (g passes unchanged); later: they conflict (g projected)
            assert (s["coef"] == 0.0) if s["step"] == 0 else (s["coef"] < 0), where
            assert s["global_steps"] == s["step"] + 1 and s["micro_steps"] == 2 * (s["step"] + 1)
            if r["bf16"]:  # bf16 forwards: equal up to bf16 rounding; g_ref leaking into g is far off
                assert s["grad_rel"] < 0.1 and s["coef"] == pytest.approx(s["ref_coef"], rel=0.05)
                continue
            # the gradient the optimizer received (both ranks' partitions) == plain torch A-GEM
            assert s["grad_err"] < 1e-5, where
            assert s["coef"] == pytest.approx(s["ref_coef"], rel=1e-5, abs=1e-12), where
            # the memory pass left the weights and AdamW's state as a plain step would
            assert s["start_weight_err"] < 1e-5 and s["weight_err"] < 5e-3, where
