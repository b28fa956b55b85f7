"""Activation checkpointing: a step's loss and gradients equal those without it (fp32, CPU), for plain
training, a LoRA adapter on a frozen base and DAS's hooked contrastive passes; and it really checkpoints
(fewer tensors kept for backward)."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cltk.activations import (
    checkpointing_on,
    checkpointing_suspended,
    enable_activation_checkpointing,
)
from cltk.forward import next_token_logits
from cltk.losses import causal_lm_loss
from tests.tiny_run import TINY_MODEL

TIGHT = {"rtol": 1e-6, "atol": 1e-7}


def tiny(layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    spec = {k: v for k, v in TINY_MODEL.items() if k != "model_type"}
    spec.update(num_hidden_layers=layers, vocab_size=97)
    cfg = AutoConfig.for_model("llama", **spec)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).train()


def ids() -> torch.Tensor:
    return torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))


def step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, int]:
    """The loss, every gradient, and how many tensors autograd kept for backward."""
    model.zero_grad(set_to_none=True)
    saved = [0]

    def pack(t):
        saved[0] += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = causal_lm_loss(next_token_logits(model, model, x), x[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, saved[0]


def assert_same(a: tuple, b: tuple) -> None:
    torch.testing.assert_close(a[0], b[0], **TIGHT)
    assert a[1].keys() == b[1].keys() and a[1]
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **TIGHT, msg=name)


def test_plain_step_equals_without_checkpointing_and_keeps_fewer_tensors():
    plain = tiny(layers=4)
    ckpt = copy.deepcopy(plain)
    assert enable_activation_checkpointing(ckpt) == 4  # the layers (their model is flagged too)
    assert checkpointing_on(ckpt) and not checkpointing_on(plain)
    x = ids()
    a, b = step(plain, x), step(ckpt, x)
    assert_same(a, b)
    assert b[2] < a[2] / 2  # each layer keeps its input only (the recomputed tensors are not counted)
    with checkpointing_suspended(ckpt):
        assert not checkpointing_on(ckpt)
        assert step(ckpt, x)[2] == a[2]
    assert checkpointing_on(ckpt)


def test_lora_on_a_frozen_base_gets_the_same_adapter_gradients():
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    plain = peft.get_peft_model(tiny(), cfg)
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    x = ids()
    a, b = step(plain, x), step(ckpt, x)
    assert all("lora_" in n for n in b[1]) and len(b[1]) == 2 * 2 * 2
    assert_same(a, b)


class _Engine:
    """What DAS's contrastive term calls: the model, and ``.module``."""

    def __init__(self, model: torch.nn.Module):
        self.module = model

    def __call__(self, **kw):
        return self.module(**kw)


def _das_step(model: torch.nn.Module, x: torch.Tensor, suspend: bool = True) -> tuple:
    from cltk.methods.das.method import DasMethod

    cfg = SimpleNamespace(das=SimpleNamespace(contrastive=SimpleNamespace(weight=1.0, temperature=0.1),
                                              proxy_dropout=0.2))
    das = DasMethod.__new__(DasMethod)
    das.cfg, das.das, das.handles, das._umap = cfg, cfg.das, [], None
    g = torch.Generator().manual_seed(3)
    layers, heads = model.config.num_hidden_layers, model.config.num_attention_heads
    das.importance = {"heads": torch.rand(layers, heads, generator=g),
                      "ffn": torch.rand(layers, model.config.intermediate_size, generator=g)}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the dropout views draw from the global RNG
    ctx = SimpleNamespace(engine=_Engine(model))
    import cltk.methods.das.method as das_module

    if not suspend:  # what DAS would compute without suspending checkpointing for its gated pass
        real = das_module.checkpointing_suspended
        das_module.checkpointing_suspended = lambda m: torch.autograd.graph.saved_tensors_hooks(
            lambda t: t, lambda t: t)
    try:
        term = das.extra_loss(ctx, {"input_ids": x}, None, None)["das_contrastive"]
    finally:
        if not suspend:
            das_module.checkpointing_suspended = real
    term.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return term.detach(), grads


def test_das_contrastive_hooks_give_the_same_gradients_under_checkpointing():
    plain = tiny()
    ckpt = copy.deepcopy(plain)
    enable_activation_checkpointing(ckpt)
    x = ids()
    a = _das_step(plain, x)
    assert_same(a, _das_step(ckpt, x))
    # the suspension is what makes it work: recomputed without its gates, the hard negative's block
    # differs from its forward, which torch refuses
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        _das_step(ckpt, x, suspend=False)


def test_attention_choice_reaches_the_model_and_flash_attention_is_refused_up_front(tmp_path, capsys):
    import importlib.util

    from cltk.cli import main
    from cltk.models import build_model
    from cltk.validate import load_config
    from tests.tiny_run import write_tiny_run

    path = write_tiny_run(tmp_path)
    cfg = load_config(path, overrides=["model.attn_implementation=eager"])

    class Vocab:  # what build_model reads of a tokenizer
        def __len__(self) -> int:
            return 400

    assert build_model(cfg, Vocab()).config._attn_implementation == "eager"
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    code = main(["train", "--config", str(path), "--set", "model.attn_implementation=flash_attention_2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("cltk: model.attn_implementation: flash_attention_2 needs the flash-attn")
    assert not (tmp_path / "out").exists()  # refused before any work
