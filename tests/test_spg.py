"""SPG: the importance math against hand computations and a whole-tensor reference, the sharded form
against the whole-tensor one, and an SPG-masked AdamW step against a free one (one process)."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import transformers as T

from cltk.config import ConfigError
from cltk.methods.kit.zero_view import Fragment, Partition, ZeroView
from cltk.methods.spg import SpgConfig
from cltk.methods.spg.importance import accumulate, importance
from cltk.methods.spg.method import SpgMethod
from cltk.methods.spg.sharded import (
    SpgLayoutError,
    full_importance,
    importance_from_grads,
    layout_record,
)
from cltk.validate import load_config
from tests.tiny_run import write_tiny_run


def test_importance_matches_a_hand_computation():
    # g = 1, 2, 3, 4: mean 2.5, unbiased variance (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3, so
    # z = -+1.5 / 1.290994 = -+1.161895 and -+0.5 / 1.290994 = -+0.387298;
    # tanh(1.161895) = (e^2.323790 - 1) / (e^2.323790 + 1) = 9.214313 / 11.214313 = 0.821656,
    # tanh(0.387298) = (e^0.774597 - 1) / (e^0.774597 + 1) = 1.169717 / 3.169717 = 0.369029
    got = importance(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    want = torch.tensor([[0.821656, 0.369029], [0.369029, 0.821656]])
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    # the sign does not matter (|tanh|), nor the scale (standardised): a sum or a mean over steps,
    # clipped or not, scores alike
    torch.testing.assert_close(importance(torch.tensor([-4.0, -3.0, -2.0, -1.0]) * 7), want.flatten())
    # no spread: nothing tells the elements apart
    assert torch.equal(importance(torch.full((3, 2), 0.25)), torch.zeros(3, 2))
    assert torch.equal(importance(torch.tensor([5.0])), torch.zeros(1))
    # accumulated by element-wise max, in place
    old = torch.tensor([0.1, 0.9, 0.5])
    out = accumulate(old, torch.tensor([0.4, 0.2, 0.5]))
    assert out is old and torch.equal(old, torch.tensor([0.4, 0.9, 0.5]))


def _split_view(shapes: dict[str, tuple[int, ...]], cuts: list[list[tuple[str, int, int]]]):
    """A ZeroView of hand-made partitions: each a list of ``(param, start, numel)`` fragments, padded
    by 3 elements at the end (as ZeRO 3 pads)."""
    params = {n: torch.nn.Parameter(torch.zeros(s)) for n, s in shapes.items()}
    parts = []
    for frags in cuts:
        offset, fr = 0, []
        for name, start, numel in frags:
            fr.append(Fragment(name, params[name], start, numel, offset))
            offset += numel
        parts.append(Partition(torch.zeros(offset + 3), fr))
    return ZeroView("zero3", parts, [])


@pytest.mark.parametrize("in_place", [False, True])
def test_sharded_importance_equals_the_whole_tensor_reference(in_place):
    """Parameters cut across partitions (as ZeRO 1/2/3 cut them across ranks): per-tensor statistics
    gathered from the fragments give exactly the whole-tensor importance; padding scores 0."""
    shapes = {"a": (3, 5), "b": (7,), "c": (2, 2), "d": (4,)}
    cuts = [[("a", 0, 9), ("b", 0, 2)], [("a", 9, 6), ("b", 2, 5), ("c", 0, 4)], [("d", 0, 4)]]
    view = _split_view(shapes, cuts)
    gen = torch.Generator().manual_seed(0)
    full = {n: torch.randn(s, generator=gen) * (i + 1) + i for i, (n, s) in enumerate(shapes.items())}
    full["d"] = torch.full((4,), 3.0)  # no spread: 0
    grads = []
    for part in view.partitions:
        g = torch.randn(part.numel, generator=gen)  # padding: noise that must be ignored
        for f in part.fragments:
            g[f.offset : f.offset + f.numel] = full[f.name].flatten()[f.start : f.start + f.numel]
        grads.append(g)
    imp = importance_from_grads(view, grads, list(shapes), in_place=in_place)
    assert (imp[0].data_ptr() == grads[0].data_ptr()) == in_place
    for part, t in zip(view.partitions, imp):
        assert torch.equal(t[-3:], torch.zeros(3))
    saved = {f"importance.{i}": t for i, t in enumerate(imp)} | layout_record(view)
    merged = full_importance([saved])
    for name, g in full.items():
        torch.testing.assert_close(merged[name].view(g.shape), importance(g), atol=1e-6, rtol=0)
    assert float(merged["d"].abs().max()) == 0.0


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, attention_bias=True,
    )
    return T.AutoModelForCausalLM.from_config(config)


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(100 + step))


class Run:
    """One stage with a plain torch AdamW (ZeRO 0, fp32: the ``plain`` layout) and SPG's hooks."""

    def __init__(self, method: SpgMethod, model: torch.nn.Module, steps: int, block=(0, 1)):
        self.model, self.method = model, method
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        engine = SimpleNamespace(module=model, optimizer=self.opt)
        stage = SimpleNamespace(block=block[0], blocks=block[1], name="d", domain="d")
        self.ctx = SimpleNamespace(engine=engine, stage=stage, schedule=range(steps), step=0)
        method.on_engine_ready(self.ctx)

    def step(self, step: int) -> None:
        self.ctx.step = step
        self.opt.zero_grad()
        ids = batch(step)
        self.model(input_ids=ids, labels=ids).loss.backward()
        self.method.after_backward(self.ctx)
        self.opt.step()


def test_spg_masked_adamw_step_moves_each_element_1_minus_importance():
    """Stage 0 scores importance from the gradients of its last 2 steps (== the whole-tensor reference
    on their summed gradients); stage 1 (a new model and optimizer, like a new engine) then moves every
    element exactly (1 - importance) as far as a free AdamW step from the same state would, with weight
    decay and Adam's moments; a changed model is refused by name of the mismatch."""
    method = SpgMethod(None, SpgConfig(importance_steps=2))
    run = Run(method, tiny_llama(), steps=4)
    want_sum: dict[str, torch.Tensor] = {}
    for step in range(4):
        run.step(step)
        if step >= 2:
            for n, p in run.model.named_parameters():
                want_sum[n] = want_sum.get(n, 0) + p.grad
    method.on_stage_end(run.ctx)
    saved = method.state_tensors()
    assert not any(k.startswith("grad_sum") for k in saved)
    imp = full_importance([saved])
    for n, g in want_sum.items():
        torch.testing.assert_close(imp[n].view(g.shape), importance(g), atol=1e-6, rtol=0)

    # the next stage: a fresh method restored from the saved tensors, as a resumed run does
    method2 = SpgMethod(None, SpgConfig(importance_steps=2))
    method2.load_state_tensors(saved)
    run2 = Run(method2, tiny_llama(seed=1), steps=3)
    assert method2.blend is not None and method2.blend.layout == "plain"
    for step in range(3):
        free_model = copy.deepcopy(run2.model)
        free_opt = torch.optim.AdamW(free_model.parameters(), lr=1e-2, weight_decay=0.1)
        free_opt.load_state_dict(copy.deepcopy(run2.opt.state_dict()))
        before = {n: p.detach().clone() for n, p in run2.model.named_parameters()}
        run2.step(step)
        free_opt.zero_grad()  # the free copy: the same batch from the same weights and Adam state
        ids = batch(step)
        free_model(input_ids=ids, labels=ids).loss.backward()
        free_opt.step()
        free = dict(free_model.named_parameters())
        worst, biggest = 0.0, 0.0
        for n, p in run2.model.named_parameters():
            d_free = free[n].detach() - before[n]
            want = (1 - imp[n].view(p.shape)) * d_free
            worst = max(worst, float((p.detach() - before[n] - want).abs().max()))
            biggest = max(biggest, float(d_free.abs().max()))
        assert biggest > 5e-3 and worst < 5e-7, (step, worst, biggest)
    full = torch.cat([t.flatten() for t in imp.values()])
    assert float(full.min()) < 0.05 and float(full.max()) > 0.95  # the blend spans the whole range

    other = SpgMethod(None, SpgConfig())
    other.load_state_tensors(saved)
    bigger = tiny_llama()
    bigger.lm_head = torch.nn.Linear(16, 65, bias=False)
    with pytest.raises(SpgLayoutError, match="lm_head.weight was"):
        Run(other, bigger, steps=1)


def test_blocks_of_one_domain_score_only_at_its_last_block():
    method = SpgMethod(None, SpgConfig(importance_steps=5))
    run = Run(method, tiny_llama(), steps=2, block=(0, 2))
    run.step(0)
    run.step(1)
    assert method.grad_sum is None
    method.on_stage_end(run.ctx)
    assert method.importance is None and method.state_tensors() == {}


@pytest.mark.parametrize(
    "sections, ds, key",
    [
        ({"spg": {"importance_steps": 0}}, None, "spg.importance_steps"),
        ({"spg": {}, "lora": {}}, None, "spg"),
        ({"spg": {}}, {"zero_optimization": {"stage": 0}, "fp16": {"enabled": True}}, "deepspeed"),
        ({"spg": {}}, {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}},
         "deepspeed"),
    ],
)
def test_bad_settings_are_refused_at_load(tmp_path, sections, ds, key):
    path = write_tiny_run(tmp_path, **sections)
    if ds is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.key == key, err.value


def test_resumed_inside_the_scoring_window_scores_as_an_uninterrupted_stage():
    """The gradient sum travels in checkpoints: a stage stopped after its first scoring step and resumed
    on a new engine (state restored after ``on_engine_ready``, as the loop does) scores the same."""
    whole = SpgMethod(None, SpgConfig(importance_steps=3))
    run = Run(whole, tiny_llama(), steps=4)
    for step in range(4):
        run.step(step)
    whole.on_stage_end(run.ctx)

    first = SpgMethod(None, SpgConfig(importance_steps=3))
    run = Run(first, tiny_llama(), steps=4)
    for step in range(2):
        run.step(step)
    saved = {k: v.clone() for k, v in first.state_tensors().items()}
    assert {"grad_sum.0", "numel.0"} <= saved.keys() and "importance.0" not in saved
    model, opt_state = copy.deepcopy(run.model), copy.deepcopy(run.opt.state_dict())
    resumed = SpgMethod(None, SpgConfig(importance_steps=3))
    run = Run(resumed, model, steps=4)
    run.opt.load_state_dict(opt_state)
    resumed.load_state_tensors(saved)
    for step in range(2, 4):
        run.step(step)
    resumed.on_stage_end(run.ctx)
    for a, b in zip(whole.importance, resumed.importance):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
