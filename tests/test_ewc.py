"""EWC / online EWC: the arithmetic by hand, one process against plain torch, 2 ranks under
ZeRO 1/2/3, and a two-stage ``cltk train`` run."""

from __future__ import annotations

import copy
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from cltk.config import ConfigError
from cltk.methods.ewc import EwcConfig
from cltk.methods.ewc.method import EwcMethod, EwcStateError
from cltk.methods.ewc.penalty import add_square_, fold_fisher, penalty_
from cltk.validate import load_config
from tests.kit import ODD_SIZES, TINY_LLAMA, tiny_llama
from tests.kit.zero import ds_config, gather_partitions, rel_err

LONG_LLAMA = {**TINY_LLAMA, "max_position_embeddings": 256}  # the default data.seq_len fits


# ----- the arithmetic ---------------------------------------------------------------------------
def test_penalty_and_its_gradient_by_hand():
    theta = torch.tensor([1.0, 1.0, 1.0, 1.0, 3.0])
    anchor = torch.tensor([0.0, 2.0, 1.0, -1.0, 3.0])
    fisher = torch.tensor([1.0, 2.0, 5.0, 4.0, 7.0])
    grad = torch.tensor([10.0, 10.0, 10.0, 10.0, 10.0])
    # d = [1, -1, 0, 2, 0]; F d = [1, -2, 0, 8, 0]; F d^2 = [1, 2, 0, 16, 0] -> sum 19
    value = penalty_(theta, anchor, fisher, 0.5, grad=grad, chunk=2)  # slices cross the elements
    assert value.dtype == torch.float64 and float(value) == pytest.approx(0.25 * 19)
    assert grad.tolist() == [10.5, 9.0, 10.0, 14.0, 10.0]
    assert float(penalty_(theta, anchor, fisher, 0.5)) == pytest.approx(4.75)  # value only
    with pytest.raises(ValueError, match="equal sizes"):
        penalty_(theta, anchor[:3], fisher, 1.0)


def test_fisher_sums_squares_and_folds_with_gamma():
    acc = torch.zeros(2)
    for g in ([1.0, -2.0], [3.0, 2.0]):
        add_square_(acc, torch.tensor(g))
    assert acc.tolist() == [10.0, 8.0]
    assert fold_fisher(None, acc.clone(), 2, 0.5).tolist() == [5.0, 4.0]
    old = torch.tensor([2.0, 6.0])
    assert fold_fisher(old, acc.clone(), 2, 0.5).tolist() == [6.0, 7.0]  # 0.5 * old + acc / 2
    assert fold_fisher(old, acc.clone(), 2, 1.0).tolist() == [7.0, 10.0]
    with pytest.raises(ValueError, match="at least one step"):
        fold_fisher(None, acc, 0, 1.0)


# ----- settings refused at load -----------------------------------------------------------------
def _config(tmp_path: Path, ds: dict | None = None, **sections) -> Path:
    (tmp_path / "ds.json").write_text(json.dumps(ds or {"zero_optimization": {"stage": 2}}))
    raw = {
        "deepspeed": "ds.json",
        "model": {"config": LONG_LLAMA},
        "tokenizer": {"train": {"vocab_size": 400}},
        "domains": [{"name": "a", "source": {"builtin": "stdlib"}}],
        **sections,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "run.yaml"


@pytest.mark.parametrize(
    "ewc,other,ds,key,words",
    [
        ({}, {}, None, "ewc.lam", "set the penalty"),
        ({"lam": -1.0}, {}, None, "ewc.lam", ">= 0"),
        ({"lam": 1.0, "gamma": 1.5}, {}, None, "ewc.gamma", "[0, 1]"),
        ({"lam": 1.0, "gamma": -0.1}, {}, None, "ewc.gamma", "[0, 1]"),
        ({"lam": 1.0, "fisher_steps": 0}, {}, None, "ewc.fisher_steps", ">= 1"),
        ({"lam": 1.0, "fisher": "exact"}, {}, None, "ewc.fisher", "'batch' or 'sample'"),
        ({"lam": 1.0, "fisher": "sample", "fisher_samples": 0}, {}, None, "ewc.fisher_samples", ">= 1"),
        ({"lam": 1.0}, {"lora": {"base": "frozen"}}, None, "ewc", "protect nothing"),
        ({"lam": 1.0}, {}, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "ewc",
         "ZeRO stage 1, 2 or 3"),
    ],
)
def test_bad_settings_are_refused_at_load_naming_the_key(tmp_path, ewc, other, ds, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(_config(tmp_path, ds, ewc=ewc, **other), world_size=1)
    assert e.value.key == key and words in str(e.value), str(e.value)


def test_good_settings_load():
    cfg = load_config(raw=yaml.safe_load(_config_text()), world_size=1)
    assert cfg.ewc == EwcConfig(lam=0.0, gamma=0.9, fisher_steps=3)


def _config_text() -> str:
    root = Path(__file__).resolve().parents[1]
    return (
        f"deepspeed: {root / 'ds_configs' / 'zero3.json'}\n"
        f"model: {{config: {json.dumps(LONG_LLAMA)}}}\n"
        "tokenizer: {train: {vocab_size: 400}}\n"
        "domains: [{name: a, source: {builtin: stdlib}}]\n"
        "ewc: {lam: 0, gamma: 0.9, fisher_steps: 3}\n"
    )


# ----- one process: the hooks against plain torch -----------------------------------------------
def tiny() -> torch.nn.Module:
    return tiny_llama(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)


def batches(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 12), generator=gen) for _ in range(n)]


def fake_stage(model, steps: int, name: str):
    """What the loop hands a method: an engine whose optimizer is plain torch AdamW (ZeRO 0)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine = SimpleNamespace(module=model, optimizer=opt)
    stage = SimpleNamespace(name=name)
    return SimpleNamespace(engine=engine, step=0, schedule=range(steps), stage=stage)


def perturb(*models, seed: int = 5) -> None:
    """The same seeded noise (sd 0.05) added to each model's parameters: a start elsewhere."""
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        for ps in zip(*(m.parameters() for m in models)):
            noise = 0.05 * torch.randn(ps[0].shape, generator=gen)
            for p in ps:
                p.add_(noise)


def ewc_penalty(fisher: dict, anchor: dict, model, lam: float) -> torch.Tensor:
    """lam/2 sum F (theta - theta*)^2, through autograd."""
    return lam / 2 * sum(
        (fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in model.named_parameters()
    )


def _stage_one_matches(method, model, ref) -> tuple[object, dict, dict]:
    """Stage 1, the hooks beside plain AdamW: F and theta* equal the reference's (returned)."""
    ctx = fake_stage(model, 3, "s1")
    method.on_engine_ready(ctx)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    fisher = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for step, ids in enumerate(batches(3, 0)):
        ctx.step = step
        assert method.extra_loss(ctx, {}, torch.zeros(1), torch.zeros(1)) == {}  # no Fisher yet
        for m, opt in ((model, ctx.engine.optimizer), (ref, ref_opt)):
            m(input_ids=ids, labels=ids).loss.backward()
            if m is ref and step >= 1:
                for n, p in ref.named_parameters():
                    fisher[n] += p.grad**2 / 2
            opt.step()
            opt.zero_grad()
    view = method.view
    method.on_stage_end(ctx)
    anchor = {n: p.detach().clone() for n, p in ref.named_parameters()}
    got_f = gather_partitions(view, method.fisher, model)
    got_a = gather_partitions(view, method.anchor, model)
    for n in fisher:
        torch.testing.assert_close(got_f[n], fisher[n], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(got_a[n], anchor[n], rtol=0, atol=0)
    return ctx, fisher, anchor


def _stage_two_matches(method, model, ref, fisher: dict, anchor: dict, lam: float) -> None:
    """Stage 2's steps with the hooks equal plain AdamW on CE + penalty: gradients, weights, penalty."""
    ctx = fake_stage(model, 4, "s2")
    method.on_engine_ready(ctx)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step, ids in enumerate(batches(2, 1)):
        ctx.step = step
        reported = method.extra_loss(ctx, {}, torch.zeros(1), torch.zeros(1))["ewc_penalty"]
        model(input_ids=ids, labels=ids).loss.backward()
        ce_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
        ctx.engine.optimizer.step()  # the hook adds lam F (theta - theta*) to .grad first
        penalty = ewc_penalty(fisher, anchor, ref, lam)
        (ref(input_ids=ids, labels=ids).loss + penalty).backward()
        assert float(reported) == pytest.approx(float(penalty.detach()), rel=1e-5)
        moved = sum(float((p.grad - ce_grad[n]).norm()) for n, p in model.named_parameters())
        assert moved > 0.1 * sum(float(g.norm()) for g in ce_grad.values())  # the penalty matters
        for (n, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-7)
        ref_opt.step()
        for p, q in zip(model.parameters(), ref.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
        ctx.engine.optimizer.zero_grad()
        ref_opt.zero_grad()


def _saved_state_restores(method, model, saved_state: dict, buffer: io.BytesIO, lam: float) -> None:
    """The saved state restores into a new method on a new engine; a different layout is refused."""
    buffer.seek(0)
    saved_tensors = torch.load(buffer, weights_only=True)
    again = EwcMethod(EwcConfig(lam=lam, gamma=1.0, fisher_steps=2, report_penalty=False))
    again.load_state_dict(saved_state)
    again.load_state_tensors(saved_tensors)
    ctx = fake_stage(model, 4, "s2")
    again.on_engine_ready(ctx)
    for a, b in zip(again.fisher + again.anchor, method.fisher + method.anchor):
        assert torch.equal(a, b)
    assert again.extra_loss(ctx, {}, torch.zeros(1), torch.zeros(1)) == {}  # report_penalty off
    model.lm_head.weight.requires_grad_(False)
    with pytest.raises(EwcStateError, match="laid out for other ZeRO partitions"):
        again.on_engine_ready(fake_stage(model, 4, "s2"))
    lost = EwcMethod(EwcConfig(lam=lam))
    lost.load_state_dict(saved_state)
    with pytest.raises(EwcStateError, match="holds none"):
        lost.load_state_tensors({})


def test_hooks_equal_adamw_on_loss_plus_penalty():
    """Stage 1 makes F (mean g^2 of its last 2 of 3 steps) and theta*; stage 2's steps with the
    hooks equal plain AdamW on CE + lam/2 sum F (theta - theta*)^2 through autograd: gradients,
    weights and the reported penalty."""
    lam = 300.0
    model, ref = tiny(), tiny()
    method = EwcMethod(EwcConfig(lam=lam, gamma=1.0, fisher_steps=2))
    _, fisher, anchor = _stage_one_matches(method, model, ref)
    perturb(model, ref)  # stage 2 starts elsewhere (as from a bf16 export): the penalty pulls back
    saved_state, buffer = method.state_dict(), io.BytesIO()
    torch.save(method.state_tensors(), buffer)  # as into methods_rank0.pt
    _stage_two_matches(method, model, ref, fisher, anchor, lam)
    _saved_state_restores(method, model, saved_state, buffer, lam)


def test_resume_inside_the_fisher_window_equals_an_uninterrupted_stage():
    """The loop's resume order: a new engine, on_engine_ready, then the checkpoint's state and
    tensors (the running sum of g * g included); the stage then ends with the same F and anchor."""
    model = tiny()
    method = EwcMethod(EwcConfig(lam=1.0, fisher_steps=3))
    ctx = fake_stage(model, 4, "s1")
    method.on_engine_ready(ctx)

    def step(m, c, i, ids):
        c.step = i
        m(input_ids=ids, labels=ids).loss.backward()
        c.engine.optimizer.step()
        c.engine.optimizer.zero_grad()

    data = batches(4, 3)
    for i in range(2):
        step(model, ctx, i, data[i])
    assert method.window_steps == 1 and method.square_sum is not None
    state = json.loads(json.dumps(method.state_dict()))
    tensors = {k: v.clone() for k, v in method.state_tensors().items()}
    twin = copy.deepcopy(model)
    resumed = EwcMethod(EwcConfig(lam=1.0, fisher_steps=3))
    ctx2 = fake_stage(twin, 4, "s1")
    ctx2.engine.optimizer.load_state_dict(copy.deepcopy(ctx.engine.optimizer.state_dict()))
    resumed.on_engine_ready(ctx2)
    resumed.load_state_dict(state)
    resumed.load_state_tensors(tensors)
    for i in range(2, 4):
        step(model, ctx, i, data[i])
        step(twin, ctx2, i, data[i])
    method.on_stage_end(ctx)
    resumed.on_stage_end(ctx2)
    assert method.stages == resumed.stages == 1
    for a, b in zip(method.fisher + method.anchor, resumed.fisher + resumed.anchor):
        assert torch.equal(a, b)


# ----- two ranks, ZeRO 1, 2 and 3 ---------------------------------------------------------------
# Per ZeRO stage (one engine after the other, in the same 2 processes): stage A trains the tiny Llama of
# odd sizes (ZeRO 3 pads, ZeRO 1/2 fragments straddle ranks) 3 steps on per-rank batches with the EWC
# hooks (Fisher window: the last 2 steps); its Fisher and anchor, gathered from both ranks' partitions,
# are compared with plain torch on the global batch (mean g * g of the averaged, clipped gradient; final
# weights). Stage B builds a new engine from perturbed weights, takes 2 steps with the penalty on, and
# compares the gradient the optimizer received, the reported penalty and the final weights with plain
# torch on CE + penalty. The ZeRO 1 run's EWC state is offered to the ZeRO 3 engine, which must refuse it.
LR, WD, LAM, STEPS_A, STEPS_B, FISHER_STEPS, CLIP = 1e-2, 0.1, 300.0, 3, 2, 2, 1.0


def batch(step: int, rank: int, stage_b: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * stage_b + 10 * step + rank)
    return torch.randint(0, 64, (2, 16), generator=gen)


def optimizer(model):
    from cltk.engine import param_groups

    return torch.optim.AdamW(param_groups(model, WD), lr=LR, weight_decay=WD)


def engine_for(model, stage: int):
    import deepspeed

    config = ds_config(stage, micro_batch=2, gradient_clipping=CLIP)
    return deepspeed.initialize(model=model, optimizer=optimizer(model), config=config)[0]


def stage_context(engine, steps: int, name: str) -> SimpleNamespace:
    """The parts of :class:`cltk.method.StageContext` the EWC hooks read."""
    stage = SimpleNamespace(name=name)
    return SimpleNamespace(engine=engine, step=0, schedule=range(steps), stage=stage)


def global_ce(model, step: int, world: int, stage_b: bool) -> torch.Tensor:
    """The loss DeepSpeed's averaged gradient belongs to: the mean over ranks of their mean CE."""
    ids = [batch(step, r, stage_b) for r in range(world)]
    return sum(model(input_ids=b, labels=b).loss for b in ids) / world


def _zero_stage_a(stage: int, rank: int, world: int, out: dict, clipped: list[bool]):
    """Stage A: F and anchor under ZeRO against plain torch (errors into ``out``); the reference's."""
    ref = tiny_llama(**ODD_SIZES)
    ref_opt = optimizer(ref)
    engine = engine_for(tiny_llama(**ODD_SIZES), stage)
    method = EwcMethod(EwcConfig(lam=LAM, gamma=1.0, fisher_steps=FISHER_STEPS))
    ctx = stage_context(engine, STEPS_A, "A")
    method.on_engine_ready(ctx)
    fisher = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for step in range(STEPS_A):
        ctx.step = step
        ids = batch(step, rank, False)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        global_ce(ref, step, world, False).backward()
        clipped.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)) > CLIP)
        if step >= STEPS_A - FISHER_STEPS:
            for n, p in ref.named_parameters():
                fisher[n] += p.grad**2 / FISHER_STEPS
        ref_opt.step()
        ref_opt.zero_grad()
    view = method.view
    method.on_stage_end(ctx)
    anchor = {n: p.detach().clone() for n, p in ref.named_parameters()}
    out["layout"] = view.layout
    out["fisher_rel_err"] = rel_err(gather_partitions(view, method.fisher, ref), fisher)
    out["anchor_rel_err"] = rel_err(gather_partitions(view, method.anchor, ref), anchor)
    out["fisher_max"] = max(float(f.max()) for f in fisher.values())
    # memory: this rank's F + theta* (bytes) against the model's trainable parameters
    out["state_bytes_rank"] = sum(4 * t.numel() for t in method.fisher + method.anchor)
    out["trainable"] = sum(p.numel() for p in ref.parameters())
    engine.destroy()
    return method, ref, fisher, anchor


def _foreign_refused(old_method, engine) -> bool:
    """State made by another ZeRO layout must be refused, not misread."""
    try:
        old_method.on_engine_ready(stage_context(engine, STEPS_B, "B"))
    except EwcStateError:
        return True
    return False


def _zero_stage_b(engine, method, ref, fisher, anchor, rank, world, clipped) -> dict:
    """Stage B: the penalty's steps under ZeRO against plain torch on CE + penalty; the errors."""
    from cltk.methods.kit.zero_view import zero_view

    ref_opt = optimizer(ref)
    ctx = stage_context(engine, STEPS_B, "B")
    method.on_engine_ready(ctx)
    seen: list[torch.Tensor] = []
    grads = zero_view(engine)  # a second view: captures .grad right after the EWC hook ran
    grads.on_step(before=lambda parts: seen.extend((i, p.tensor.grad.clone()) for i, p in parts))
    grad_err, pen_err, pen_share = 0.0, 0.0, 0.0
    for step in range(STEPS_B):
        ctx.step = step
        ids = batch(step, rank, True)
        reported = float(method.extra_loss(ctx, {}, torch.zeros(1), torch.zeros(1))["ewc_penalty"])
        seen.clear()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        got = gather_partitions(grads, [t for _, t in sorted(seen, key=lambda x: x[0])], ref)
        penalty = ewc_penalty(fisher, anchor, ref, LAM)
        global_ce(ref, step, world, True).backward()
        clipped.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)) > CLIP)
        ce_grad = {n: p.grad.clone() for n, p in ref.named_parameters()}
        penalty.backward()
        want = {n: p.grad.clone() for n, p in ref.named_parameters()}
        grad_err = max(grad_err, rel_err(got, want))
        pen_share = max(pen_share, rel_err(ce_grad, want))  # how much the penalty changes g
        pen_err = max(pen_err, abs(reported / float(penalty.detach()) - 1))
        ref_opt.step()
        ref_opt.zero_grad()
    final = {n: p.detach() for n, p in ref.named_parameters()}
    parts = [p.tensor.detach() for p in method.view.partitions]
    weight_err = rel_err(gather_partitions(method.view, parts, ref), final)
    method.on_stage_end(ctx)
    return dict(grad_rel_err=grad_err, penalty_rel_err=pen_err, weight_rel_err=weight_err,
                penalty_grad_share=pen_share)


def ewc_under_zero(stage: int, old_method) -> tuple[dict, object]:
    from cltk import distributed as dist

    rank, world = dist.rank(), dist.world_size()
    out: dict = {"stage": stage, "world": world}
    clipped: list[bool] = []  # DeepSpeed clips before the EWC hook sees g; so does the reference
    method, ref, fisher, anchor = _zero_stage_a(stage, rank, world, out, clipped)
    perturb(ref)  # stage B: the penalty, on a new engine from perturbed weights
    engine = engine_for(copy.deepcopy(ref), stage)
    if old_method is not None:
        out["foreign_refused"] = _foreign_refused(old_method, engine)
    errors = _zero_stage_b(engine, method, ref, fisher, anchor, rank, world, clipped)
    out.update(clipped_steps=sum(clipped), **errors)
    engine.destroy()
    return out, method


def ewc_under_zero_1_2_3() -> list[dict]:
    results, previous = [], None
    for stage in (1, 2, 3):
        res, method = ewc_under_zero(stage, previous if stage == 3 else None)
        results.append(res)
        previous = method
    return results


@pytest.mark.multirank
@pytest.mark.on_two_ranks("ewc_under_zero_1_2_3")
def test_two_ranks_under_zero_1_2_3_equal_one_process(on_two_ranks):
    assert [r["stage"] for r in on_two_ranks] == [1, 2, 3]
    for r in on_two_ranks:
        print(r)
        assert r["world"] == 2
        assert r["layout"] == ("zero3" if r["stage"] == 3 else "zero1/2"), r
        assert r["fisher_max"] > 0 and r["fisher_rel_err"] < 1e-4, r
        assert r["anchor_rel_err"] < 5e-5, r  # after 3 AdamW steps: float rounding only
        assert r["clipped_steps"] > 0, r  # DeepSpeed clipped: the reference clips the same way
        assert r["penalty_grad_share"] > 0.1, r  # the penalty changes the gradient a lot...
        assert r["grad_rel_err"] < 1e-4, r  # ...and exactly as plain torch's autograd does
        assert r["penalty_rel_err"] < 1e-5 and r["weight_rel_err"] < 5e-5, r
    assert on_two_ranks[2]["foreign_refused"] is True


# ----- two ranks, ZeRO 1, 2 and 3: the per-sample Fisher (ewc.fisher: sample) ----------------------
# At a stage's end every rank runs the same few single sequences through the engine; the Fisher, gathered
# from both ranks' partitions, must equal the mean over those sequences of each one's squared gradient in
# plain torch, and no step may have been taken (the anchor is the starting weights).
SAMPLE_SEQS = [torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(50 + i)) for i in range(5)]


class _Trained:
    """The parts of the stage's schedule the per-sample Fisher reads: its trained sequences."""

    def __len__(self) -> int:
        return 2

    def trained_new(self) -> list[tuple[int, int]]:
        return [(0, i) for i in range(len(SAMPLE_SEQS))]


def ewc_sample_fisher_under_zero(stage: int) -> dict:
    import numpy as np

    from cltk import distributed as dist
    from cltk.methods.ewc.sample_fisher import pick_sequences

    ref = tiny_llama(**ODD_SIZES)
    engine = engine_for(tiny_llama(**ODD_SIZES), stage)
    method = EwcMethod(EwcConfig(lam=LAM, fisher="sample", fisher_samples=3), seed=4)
    ctx = SimpleNamespace(engine=engine, step=0, schedule=_Trained(), stage=SimpleNamespace(name="A", index=1),
                          rows=lambda items: np.stack([SAMPLE_SEQS[i].numpy() for _, i in items]))
    method.on_engine_ready(ctx)
    view = method.view
    method.on_stage_end(ctx)
    picked = pick_sequences(_Trained().trained_new(), 3, seed=4, stage_index=1)
    fisher = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    for _, i in picked:
        ids = SAMPLE_SEQS[i][None]
        ref.zero_grad()
        ref(input_ids=ids, labels=ids).loss.backward()
        for n, p in ref.named_parameters():
            fisher[n] += p.grad**2 / len(picked)
    start = {n: p.detach() for n, p in ref.named_parameters()}
    out = {
        "stage": stage, "world": dist.world_size(), "stages": method.stages,
        "fisher_rel_err": rel_err(gather_partitions(view, method.fisher, ref), fisher),
        "anchor_rel_err": rel_err(gather_partitions(view, method.anchor, ref), start),
        "fisher_max": max(float(f.max()) for f in fisher.values()),
    }
    engine.destroy()
    return out


def ewc_sample_fisher_under_zero_1_2_3() -> list[dict]:
    return [ewc_sample_fisher_under_zero(stage) for stage in (1, 2, 3)]


@pytest.mark.multirank
@pytest.mark.on_two_ranks("ewc_sample_fisher_under_zero_1_2_3")
def test_the_per_sample_fisher_on_two_ranks_equals_plain_torch(on_two_ranks):
    assert [r["stage"] for r in on_two_ranks] == [1, 2, 3]
    for r in on_two_ranks:
        assert r["world"] == 2 and r["stages"] == 1, r
        assert r["fisher_max"] > 0 and r["fisher_rel_err"] < 1e-4, r
        assert r["anchor_rel_err"] == 0.0, r  # no step was taken: the weights are the starting ones


# ----- a two-stage cltk train run ---------------------------------------------------------------


# The whole loop (2 ranks, with SPG, kill and resume): tests/test_method_state_resume.py
