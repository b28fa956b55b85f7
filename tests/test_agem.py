"""A-GEM: the projection against a hand computation and a plain reference, the memory's draws, the
config's refusals, a tiny `cltk train` run, and (real ranks) ZeRO 0-3 against plain torch A-GEM."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cltk.config import ConfigError
from cltk.methods.agem import AgemConfig
from cltk.methods.agem.memory import memory_batch, stage_sample
from cltk.methods.agem.projection import coefficient, local_dots, project_, project_reference
from cltk.validate import load_config
from tests.kit import ODD_SIZES, tiny_llama
from tests.kit.zero import ds_config, full_weights, place_fragments
from tests.multirank import run_one
from tests.tiny_run import ROOT, write_tiny_run


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
    proc = run_one(cfg, env={"PYTHONPATH": str(ROOT)}, timeout=600)
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
# A-GEM under DeepSpeed ZeRO against a plain single-process torch A-GEM. For each run (a ZeRO stage; ZeRO 2
# also with bf16 weights and fp32 gradient accumulation, whose compact gradient buffers must be dropped
# after the memory pass), in the same 2 processes, it builds the same tiny Llama on every rank (odd
# sizes: ZeRO 3 pads, ZeRO 1/2 fragments straddle ranks), hands DeepSpeed cltk's AdamW param groups
# (decay / no decay: two partitions per rank, stepped one after the other), and trains STEPS steps with
# ``cltk.engine.train_step`` and a method whose ``before_step`` captures g_ref on this rank's memory
# micro-batches and whose ``after_backward`` projects (:class:`cltk.methods.agem.reference.AgemProjector`),
# with gradient accumulation and gradient clipping on. Training and memory tokens come from disjoint
# halves of the vocabulary, so g and g_ref conflict and the projection acts, except at step 0, where the
# memory loss is negated so that they agree and g must pass unchanged. The reference is one plain torch
# model and AdamW with the same groups: g is the gradient of the mean loss over every rank's training
# micro-batches, g_ref that of every rank's memory batch, both projected by
# :func:`cltk.methods.agem.projection.project_reference`, clipped like DeepSpeed and stepped.
STEPS, GAS, MB, SEQ, VOCAB = 2, 2, 2, 16, 64
LR, WD, CLIP = 1e-2, 0.1, 0.5
AGEM_LLAMA = {**ODD_SIZES, "vocab_size": VOCAB}
AGEM_RUNS = ((0, False), (1, False), (2, False), (3, False), (2, True))  # (ZeRO stage, bf16)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    from cltk.engine import param_groups

    return torch.optim.AdamW(param_groups(model, WD), lr=LR, betas=(0.9, 0.95), weight_decay=WD)


def batches(step: int, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rank ``rank``'s training micro-batches and memory micro-batches at ``step`` (two memory
    micro-batches at step 0, so g_ref accumulates over them). Their tokens are disjoint halves of the
    vocabulary: learning one half's statistics raises the loss on the other, so g and g_ref conflict."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    train = [torch.randint(0, VOCAB // 2, (MB, SEQ), generator=gen) for _ in range(GAS)]
    memory = [
        torch.randint(VOCAB // 2, VOCAB, (MB, SEQ), generator=gen) for _ in range(2 - min(step, 1))
    ]
    return train, memory


def memory_loss(step: int):
    from cltk.losses import causal_lm_loss

    if step == 0:  # a reference gradient that agrees with the training one: g must be left alone
        return lambda logits, labels: -causal_lm_loss(logits, labels)
    return causal_lm_loss


class Capture:
    """The gradient the torch optimizer receives, per parameter, summed over ranks (each element is
    held by exactly one rank under ZeRO 1-3; by every rank under ZeRO 0)."""

    def __init__(self, view, shapes: dict[str, torch.Size]):
        self.view, self.shapes = view, shapes
        self.full: dict[str, torch.Tensor] = {}
        view.on_step(before=self.before)

    def reset(self) -> None:
        self.full = {n: torch.zeros(s.numel()) for n, s in self.shapes.items()}

    def before(self, stepped) -> None:
        place_fragments(self.full, [p for _, p in stepped], [p.tensor.grad for _, p in stepped])

    def gathered(self) -> dict[str, torch.Tensor]:
        from cltk import distributed as dist

        if self.view.layout != "plain":
            for t in self.full.values():
                dist.all_reduce_sum(t)
        return {n: t.reshape(self.shapes[n]) for n, t in self.full.items()}


def reference_step(model, opt, step: int, world: int) -> tuple[dict[str, torch.Tensor], float]:
    """One plain A-GEM step on ``model``: returns the gradient handed to AdamW and the coefficient."""
    from cltk.forward import model_forward
    from cltk.losses import causal_lm_loss
    from cltk.methods.agem.projection import coefficient, project_reference

    params = [p for p in model.parameters()]
    forward = model_forward(model)

    def grad(loss_fn, data: list[list[torch.Tensor]]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        count = sum(len(d) for d in data)
        for per_rank in data:
            for ids in per_rank:  # full batches: every micro-batch of every rank weighs the same
                (loss_fn(forward(ids), ids[:, 1:]) / count).backward()
        return torch.cat([p.grad.reshape(-1) for p in params]).clone()

    per_rank = [batches(step, r) for r in range(world)]
    # g: the mean over ranks of each rank's mean over its micro-batches; g_ref likewise (its scale does
    # not matter to the projection)
    g = grad(causal_lm_loss, [t for t, _ in per_rank])
    g_ref = grad(memory_loss(step), [m for _, m in per_rank])
    dot = float(torch.dot(g.double(), g_ref.double()))
    coef = coefficient(dot, float(torch.dot(g_ref.double(), g_ref.double())))
    g = project_reference(g, g_ref)
    norm = float(g.double().norm())
    if norm > CLIP:  # DeepSpeed: divide by (norm + 1e-6) / clip when that is > 1
        g = g / ((norm + 1e-6) / CLIP)
    out, offset = {}, 0
    for (name, p) in model.named_parameters():
        p.grad = g[offset : offset + p.numel()].reshape(p.shape).clone()
        out[name] = p.grad.clone()
        offset += p.numel()
    opt.step()
    return out, coef


def agem_under_zero(stage: int, bf16: bool = False) -> dict:
    import deepspeed

    from cltk import distributed as dist
    from cltk.engine import train_step
    from cltk.method import Method
    from cltk.methods.agem.reference import AgemProjector

    rank, world = dist.rank(), dist.world_size()
    model = tiny_llama(**AGEM_LLAMA)
    # bf16: bf16 weights, fp32 gradient accumulation (ZeRO 1/2's compact gradient buffers)
    config = ds_config(stage, micro_batch=MB, accumulation=GAS, gradient_clipping=CLIP, bf16=bf16)
    engine, *_ = deepspeed.initialize(model=model, optimizer=adamw(model), config=config)
    projector = AgemProjector(engine)
    shapes = {
        n: torch.Size(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()
    }
    capture = Capture(projector.view, shapes)

    class Agem(Method):
        name = "agem-test"
        result = None

        def before_step(self, ctx) -> None:
            projector.capture(batches(ctx.step, rank)[1], memory_loss(ctx.step))

        def after_backward(self, ctx) -> None:
            Agem.result = projector.project()

    ref_model = tiny_llama(**AGEM_LLAMA)
    ref_opt = adamw(ref_model)
    ctx = SimpleNamespace(engine=engine, stage=SimpleNamespace(name="agem"), step=0)
    out = {"stage": stage, "bf16": bf16, "world": world, "layout": projector.view.layout, "steps": []}
    for step in range(STEPS):
        ctx.step = step
        before = full_weights(engine)
        ref_before = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        start_err = max(float((before[n] - ref_before[n]).abs().max()) for n in before)
        capture.reset()
        train_step(ctx, [Agem()], batches(step, rank)[0])
        got = capture.gathered()
        want, want_coef = reference_step(ref_model, ref_opt, step, world)
        after = full_weights(engine)
        scale = max(float(w.abs().max()) for w in want.values())
        move = max(float((after[n] - before[n]).abs().max()) for n in after)
        out["steps"].append({
            "step": step,
            "grad_err": max(float((got[n] - want[n]).abs().max()) for n in want) / scale,
            "grad_rel": float(torch.cat([(got[n] - want[n]).reshape(-1) for n in want]).norm()
                              / torch.cat([w.reshape(-1) for w in want.values()]).norm()),
            "coef": Agem.result.coef,
            "ref_coef": want_coef,
            "dot": Agem.result.dot,
            "start_weight_err": start_err,
            "weight_err": max(
                float((after[n] - p.detach()).abs().max()) for n, p in ref_model.named_parameters()
            ) / move,
            "micro_steps": engine.micro_steps,
            "global_steps": engine.global_steps,
        })
    engine.destroy()
    return out


def agem_under_zero_0_1_2_3() -> list[dict]:
    return [agem_under_zero(stage, bf16) for stage, bf16 in AGEM_RUNS]


@pytest.mark.multirank
@pytest.mark.on_two_ranks("agem_under_zero_0_1_2_3")
def test_agem_projection_under_zero_matches_a_single_process_reference(on_two_ranks):
    """Per ZeRO stage and step: the gradient the engine's optimizer received (gathered from both
    ranks' partitions) against the reference's, the coefficient on both sides, and the weights after
    the step (relative to the step's largest move)."""
    layouts = {0: "plain", 1: "zero1/2", 2: "zero1/2", 3: "zero3"}
    assert [(r["stage"], r["bf16"]) for r in on_two_ranks] == list(AGEM_RUNS)
    for r in on_two_ranks:
        assert r["world"] == 2
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
