"""LoRA in one process: merged export, adapter files, the mean merge, the router, config."""

from __future__ import annotations

import copy
import types
from pathlib import Path

import datasets
import numpy as np
import peft
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cltk.config import ConfigError
from cltk.methods.kit.soft_losses import distillation_loss
from cltk.methods.lora.adapters import (
    LoraMethod,
    adapter_key,
    default_target_modules,
    export_state_dicts,
    key_base_dir,
    key_stages,
    peft_config,
    save_adapter,
)
from cltk.methods.lora.routing import MEAN, _Candidates, evaluate_frozen, load_adapter_model, route
from cltk.models import export_pretrained
from cltk.plan import Stage
from cltk.validate import load_config
from tests.tiny_run import write_tiny_run

VOCAB, T = 64, 24


def tiny_llama(seed: int = 0):
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg)


def lora_cfg(tmp_path: Path, **lora):
    return load_config(write_tiny_run(tmp_path, lora={"r": 4, "alpha": 8.0, **lora}))


def fake_engine(module):
    return types.SimpleNamespace(module=module, zero_optimization_stage=lambda: 0)


def domain_batch(kind: int, n: int, seed: int) -> torch.Tensor:
    """Two synthetic 'domains': counting up by 1 (kind 0) or down by 3 (kind 1), mod VOCAB."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    step = 1 if kind == 0 else -3
    return (start + step * torch.arange(T)) % VOCAB


def train_adapter(base_dir: Path, cfg, kind: int, out: Path) -> None:
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), peft_config(cfg, tiny_llama())
    )
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    for step in range(40):
        ids = domain_batch(kind, 8, step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    save_adapter(
        model,
        {n: p.detach() for n, p in model.named_parameters() if p.requires_grad},
        out,
        {"key": str(kind)},
    )


def test_merged_export_and_adapter_files_reproduce_the_trained_model(tmp_path):
    cfg = lora_cfg(tmp_path, target_modules=["q_proj", "v_proj", "down_proj"])
    base_dir = tmp_path / "base"
    export_pretrained(tiny_llama(), None, None, base_dir)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), peft_config(cfg, tiny_llama())
    )
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.2)  # a trained-looking adapter (B is zero at init)
    merged, adapter = export_state_dicts(fake_engine(model))
    assert adapter and all(".lora_" in k for k in adapter)
    reference = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(merged) <= set(reference) and len(merged) >= len(reference) - 1  # lm_head is tied
    for k, v in merged.items():
        torch.testing.assert_close(v, reference[k], rtol=1e-5, atol=1e-6)
    export_pretrained(model.get_base_model(), merged, None, tmp_path / "export")
    save_adapter(model, adapter, tmp_path / "adapter", {"key": "x"})
    ids = domain_batch(0, 2, 0)
    model.eval()
    trained = model(input_ids=ids).logits
    loaded = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(base_dir)), str(tmp_path / "adapter")
    ).eval()
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "export")).eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(exported(input_ids=ids).logits, trained, rtol=1e-4, atol=1e-4)
    with loaded.disable_adapter():
        assert (loaded(input_ids=ids).logits - trained).abs().max() > 1e-2  # the adapter matters
    # the base is never touched: the PEFT model's frozen weights equal the saved base
    assert torch.equal(
        model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight,
        AutoModelForCausalLM.from_pretrained(str(base_dir)).model.layers[0].self_attn.q_proj.weight,
    )


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    cfg = lora_cfg(tmp / "cfg")
    base_dir = tmp / "base"
    export_pretrained(tiny_llama(), None, None, base_dir)
    for kind in (0, 1):
        train_adapter(base_dir, cfg, kind, tmp / f"a{kind}")
    return cfg, base_dir, [tmp / "a0", tmp / "a1"]


def test_mean_merge_is_exactly_the_mean_of_the_weight_deltas(two_adapters):
    _, base_dir, dirs = two_adapters
    model, names = load_adapter_model(base_dir, dirs)
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    mean = (layer.get_delta_weight(names[0]) + layer.get_delta_weight(names[1])) / 2
    torch.testing.assert_close(layer.get_delta_weight(MEAN), mean, rtol=1e-5, atol=1e-7)


def test_router_reads_only_the_prefix_and_finds_the_domain(two_adapters):
    cfg, base_dir, dirs = two_adapters
    model, names = load_adapter_model(base_dir, dirs)
    cands, prefix = _Candidates(model, names), 8
    ids = torch.cat([domain_batch(0, 6, 100), domain_batch(1, 6, 101)])
    pre, win = cands.run(ids, prefix)
    assert pre.shape == win.shape == (4, 12)  # base, a0, a1, mean
    picks = route(pre[:3])
    assert picks.tolist() == [1] * 6 + [2] * 6
    scrambled = ids.clone()
    scrambled[:, prefix:] = torch.randint(0, VOCAB, scrambled[:, prefix:].shape)
    pre2, win2 = cands.run(scrambled, prefix)
    assert torch.equal(route(pre2[:3]), picks) and torch.allclose(pre2, pre)  # never peeks
    assert not torch.allclose(win2, win)

    def domain(kind, seed):
        rows = domain_batch(kind, 10, seed).numpy().astype(np.int32)
        return types.SimpleNamespace(eval=datasets.Dataset.from_dict({"input_ids": rows}))

    domains = {"up": domain(0, 7), "down": domain(1, 8), "other": domain(0, 9)}
    cfg.data.seq_len = T
    views = evaluate_frozen(
        cfg,
        base_dir,
        [("up", dirs[0]), ("down", dirs[1])],
        domains,
        ["up", "down", "other"],
        prefix,
        loader=load_adapter_model,
    )
    assert views["router"]["accuracy"] == 1.0
    assert views["router"]["choices"]["other"]["up"] == 10  # eval-only: the router still helps
    for d in ("up", "down"):
        assert views["oracle"][d] == pytest.approx(views["routed"][d])
        assert views["oracle"][d] < views["merged"][d] < views["base"][d]
    assert views["oracle"]["other"] == views["base"]["other"]  # no adapter of its own: the base


def test_distillation_trains_only_the_adapter_against_a_plain_teacher(tmp_path):
    cfg = lora_cfg(tmp_path)
    teacher = tiny_llama(1).eval()  # a previous stage's export is a plain model like this one
    student = peft.get_peft_model(tiny_llama(), peft_config(cfg, tiny_llama()))
    ids = domain_batch(0, 2, 3)
    with torch.no_grad():
        t_logits = teacher(input_ids=ids).logits[:, :-1]
    loss = distillation_loss(student(input_ids=ids).logits[:, :-1], ids[:, 1:], t_logits)
    loss.backward()
    grads = {
        n for n, p in student.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0
    }
    assert grads and all(".lora_" in n for n in grads)


def test_target_modules_default_to_attention_projections_and_bad_names_are_refused(tmp_path):
    assert default_target_modules(tiny_llama()) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(
            "gpt2", n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32
        )
    )
    cfg = lora_cfg(tmp_path)
    pc = peft_config(cfg, gpt2)
    assert sorted(pc.target_modules) == ["c_attn", "c_proj"] and pc.fan_in_fan_out
    with pytest.raises(ValueError, match="lora.target_modules.*q_prj"):
        peft_config(lora_cfg(tmp_path / "b", target_modules=["q_prj"]), tiny_llama())


@pytest.mark.parametrize(
    "sections, key",
    [
        ({"lora": {"r": 0}}, "lora.r"),
        ({"lora": {"per": "block"}, "blocks": {"k": 2, "across_domains": False}}, "lora.per"),
        ({"lora": {}, "distill": {}}, "distill"),
        ({"lora": {}, "blocks": {"k": 2}}, "blocks.across_domains"),
    ],
)
def test_combinations_that_make_no_sense_are_refused(tmp_path, sections, key):
    # refused when the config loads, before any launch
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config(write_tiny_run(tmp_path, **sections))
    assert "use" in str(err.value) or "must" in str(err.value)


def test_merged_blocks_continue_the_domain_adapter_on_the_weights_before_the_domain(tmp_path):
    cfg = load_config(
        write_tiny_run(tmp_path, lora={"base": "merged"}, blocks={"k": 2, "across_domains": True})
    )
    stages = [
        Stage(i, d, i // 2, i % 2, 2, np.arange(3))
        for i, d in enumerate(["code", "code", "bible", "bible"])
    ]
    assert [adapter_key(cfg, s) for s in stages] == ["code", "code", "bible", "bible"]
    assert key_stages(cfg, stages, 3) == {"code": [0, 1], "bible": [2, 3]}
    assert key_base_dir(cfg, stages, stages[3]) == (cfg.out / "stages" / "01-code-b1").resolve()
    method = LoraMethod(cfg)
    ctx = types.SimpleNamespace(stages=stages, stage=stages[3])
    stages_dir = cfg.out / "stages"
    assert method.init_dir(ctx, stages_dir / "02-bible-b0") == stages_dir / "01-code-b1"
    frozen = LoraMethod(load_config(write_tiny_run(tmp_path / "f", lora={})))
    assert frozen.init_dir(ctx, Path("anything")) is None
