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
import transformers as T
import yaml

from cltk.config import ConfigError
from cltk.methods.ewc import EwcConfig
from cltk.methods.ewc.method import EwcMethod, EwcStateError
from cltk.methods.ewc.penalty import add_square_, fold_fisher, penalty_
from cltk.validate import load_config
from tests.multirank import run_ranks

SCRIPT = Path(__file__).parent / "scripts" / "ewc_zero.py"


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
        "model": {"config": {"model_type": "llama", "hidden_size": 32}},
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
        "model: {config: {model_type: llama, hidden_size: 32}}\n"
        "tokenizer: {train: {vocab_size: 400}}\n"
        "domains: [{name: a, source: {builtin: stdlib}}]\n"
        "ewc: {lam: 0, gamma: 0.9, fisher_steps: 3}\n"
    )


# ----- one process: the hooks against plain torch -----------------------------------------------
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    )
    return T.AutoModelForCausalLM.from_config(config)


def batches(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 64, (2, 12), generator=gen) for _ in range(n)]


def fake_stage(model, steps: int, name: str):
    """What the loop hands a method: an engine whose optimizer is plain torch AdamW (ZeRO 0)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    engine = SimpleNamespace(module=model, optimizer=opt)
    stage = SimpleNamespace(name=name)
    return SimpleNamespace(engine=engine, step=0, schedule=range(steps), stage=stage)


def test_hooks_equal_adamw_on_loss_plus_penalty():
    """Stage 1 makes F (mean g^2 of its last 2 of 3 steps) and theta*; stage 2's steps with the
    hooks equal plain AdamW on CE + lam/2 sum F (theta - theta*)^2 through autograd: gradients,
    weights and the reported penalty."""
    lam = 300.0
    model, ref = tiny(), tiny()
    method = EwcMethod(EwcConfig(lam=lam, gamma=1.0, fisher_steps=2))
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
    got_f, got_a = unlay(view, method.fisher), unlay(view, method.anchor)
    for n in fisher:
        torch.testing.assert_close(got_f[n], fisher[n], rtol=1e-6, atol=1e-12)
        torch.testing.assert_close(got_a[n], anchor[n], rtol=0, atol=0)

    # stage 2 starts elsewhere (as from a bf16 export): the penalty pulls back
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p, q in zip(model.parameters(), ref.parameters()):
            noise = 0.05 * torch.randn(p.shape, generator=gen)
            p.add_(noise)
            q.add_(noise)
    saved_state, buffer = method.state_dict(), io.BytesIO()
    torch.save(method.state_tensors(), buffer)  # as into methods_rank0.pt
    ctx = fake_stage(model, 4, "s2")
    method.on_engine_ready(ctx)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    for step, ids in enumerate(batches(2, 1)):
        ctx.step = step
        reported = method.extra_loss(ctx, {}, torch.zeros(1), torch.zeros(1))["ewc_penalty"]
        model(input_ids=ids, labels=ids).loss.backward()
        ce_grad = {n: p.grad.clone() for n, p in model.named_parameters()}
        ctx.engine.optimizer.step()  # the hook adds lam F (theta - theta*) to .grad first
        penalty = sum(
            (fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in ref.named_parameters()
        ) * (lam / 2)
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

    # the saved state restores into a new method on a new engine; a different layout is refused
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


def unlay(view, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-partition flat tensors back to full parameters (plain layout: one per parameter)."""
    out = {}
    for part, t in zip(view.partitions, tensors):
        for f in part.fragments:
            out[f.name] = t.reshape(-1)[f.offset : f.offset + f.numel].view(f.param.shape)
    return out


# ----- two ranks, ZeRO 1, 2 and 3 ---------------------------------------------------------------
@pytest.mark.multirank
def test_two_ranks_under_zero_1_2_3_equal_one_process(tmp_path):
    out = tmp_path / "ewc.json"
    run_ranks(
        [SCRIPT, "--out", out, "--stages", "1", "2", "3"],
        world_size=2,
        timeout=600,
        env={"PYTHONPATH": str(SCRIPT.parents[2])},
    )
    report = json.loads(out.read_text())
    assert report["world"] == 2 and [r["stage"] for r in report["results"]] == [1, 2, 3]
    for r in report["results"]:
        print(r)
        assert r["layout"] == ("zero3" if r["stage"] == 3 else "zero1/2"), r
        assert r["fisher_max"] > 0 and r["fisher_rel_err"] < 1e-4, r
        assert r["anchor_rel_err"] < 5e-5, r  # after 3 AdamW steps: float rounding only
        assert r["clipped_steps"] > 0, r  # DeepSpeed clipped: the reference clips the same way
        assert r["penalty_grad_share"] > 0.1, r  # the penalty changes the gradient a lot...
        assert r["grad_rel_err"] < 1e-4, r  # ...and exactly as plain torch's autograd does
        assert r["penalty_rel_err"] < 1e-5 and r["weight_rel_err"] < 5e-5, r
    assert report["results"][2]["foreign_refused"] is True


# ----- a two-stage cltk train run ---------------------------------------------------------------


# The whole loop (2 ranks, with SPG, kill and resume): tests/test_method_state_resume.py
