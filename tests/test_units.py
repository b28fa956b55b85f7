"""Unit maps: a zero gate equals zeroed weights, and a unit's weights reach only that unit."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from cltk.units import attach_gates, build_unit_map

V, E, FFN, H = 64, 32, 48, 4
CONFIGS = {
    "llama": lambda: T.LlamaConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=2,
    ),
    "mistral": lambda: T.MistralConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=2,
    ),
    "qwen2": lambda: T.Qwen2Config(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=H,
        num_key_value_heads=2,
    ),
    "gpt2": lambda: T.GPT2Config(
        vocab_size=V, n_embd=E, n_layer=2, n_head=H, n_inner=FFN, bos_token_id=0, eos_token_id=0
    ),
    "gpt_neox": lambda: T.GPTNeoXConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=H,
    ),
    "opt": lambda: T.OPTConfig(
        vocab_size=V,
        hidden_size=E,
        ffn_dim=FFN,
        num_hidden_layers=2,
        num_attention_heads=H,
        word_embed_proj_dim=E,
    ),
    "phi": lambda: T.PhiConfig(
        vocab_size=V,
        hidden_size=E,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=H,
    ),
}


def tiny(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    # Random biases, so that a bias outside the map would show up in the checks below.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model, **gates) -> torch.Tensor:
    umap = build_unit_map(model)
    handles = attach_gates(model, umap, **gates)
    try:
        with torch.no_grad():
            return model(ids()).logits
    finally:
        for h in handles:
            h.remove()


def zero_slices(model, umap, layer: int, kind: str, unit: int, roles: set[str] | None) -> None:
    """Zero a unit's share of each mapped parameter (only groups that unit owns alone)."""
    params = dict(model.named_parameters())
    slices = umap.layers[layer].heads if kind == "heads" else umap.layers[layer].ffn
    with torch.no_grad():
        for s in slices:
            group = int(s.members[unit])
            if (roles is not None and s.role not in roles) or int((s.members == group).sum()) > 1:
                continue
            params[s.param].index_fill_(s.dim, s.positions[group], 0.0)


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("kind,unit", [("heads", 1), ("ffn", 5)])
@pytest.mark.parametrize("roles", [{"o", "out"}, None], ids=["output-side", "all-owned"])
def test_zero_gate_equals_zeroed_weights(arch, kind, unit, roles):
    model = tiny(arch)
    umap = build_unit_map(model)
    assert umap.arch == arch and umap.num_layers == 2
    assert (umap.num_heads, umap.intermediate) == (H, FFN)
    gates = {"heads": torch.ones(2, umap.num_heads), "ffn": torch.ones(2, umap.intermediate)}
    gates[kind][1, unit] = 0.0
    gated = logits(model, **gates)
    base = logits(model)
    assert not torch.allclose(gated, base, atol=1e-5), "the unit must matter for the check to bite"
    zero_slices(model, umap, 1, kind, unit, roles)
    torch.testing.assert_close(logits(model), gated, atol=2e-6, rtol=1e-5)


def capture_gate_inputs(model, umap, layer: int) -> dict[str, torch.Tensor]:
    seen: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, key=key: seen.__setitem__(key, args[0].detach().clone())
        )
        for key, name in (
            ("heads", umap.layers[layer].head_gate),
            ("ffn", umap.layers[layer].ffn_gate),
        )
    ]
    with torch.no_grad():
        model(ids())
    for h in handles:
        h.remove()
    # OPT flattens its FFN input to [b*T, FFN]: compare as [tokens, units, width].
    seen["heads"] = seen["heads"].reshape(-1, umap.num_heads, umap.head_dim)
    seen["ffn"] = seen["ffn"].reshape(-1, umap.intermediate, 1)
    return seen


@pytest.mark.parametrize("arch", list(CONFIGS))
@pytest.mark.parametrize("kind,unit", [("heads", 2), ("ffn", 7)])
def test_input_weights_reach_only_their_unit(arch, kind, unit):
    """Perturbing a unit's q/k/v (or gate/up/fc1) rows changes that unit's output and no other."""
    model = tiny(arch)
    umap = build_unit_map(model)
    before = capture_gate_inputs(model, umap, 1)
    params = dict(model.named_parameters())
    slices = umap.layers[1].heads if kind == "heads" else umap.layers[1].ffn
    touched = torch.zeros(len(slices[0].members), dtype=torch.bool)
    with torch.no_grad():
        for s in slices:
            if s.role in ("o", "out"):
                continue
            group = s.members[unit]
            touched |= s.members == group  # a shared KV head reaches every head of its group
            p = params[s.param]
            noise = torch.randn_like(p.index_select(s.dim, s.positions[group]))
            p.index_add_(s.dim, s.positions[group], noise)
    after = capture_gate_inputs(model, umap, 1)
    moved = (after[kind] - before[kind]).abs().amax(dim=(0, 2))  # per unit
    assert touched[unit] and bool((moved[touched] > 1e-4).all()), moved
    assert bool((moved[~touched] == 0).all()), moved


def test_gqa_kv_heads_are_shared_groups():
    umap = build_unit_map(tiny("llama"))
    k = next(s for s in umap.layers[0].heads if s.role == "k")
    assert k.members.tolist() == [0, 0, 1, 1] and tuple(k.positions.shape) == (2, E // H)


def test_peft_wrapped_model_maps_to_the_same_tensors():
    peft = pytest.importorskip("peft")
    plain = tiny("llama")
    plain_map = build_unit_map(plain)
    plain_params = dict(plain.named_parameters())
    gates = {"heads": torch.rand(2, H), "ffn": torch.rand(2, FFN)}
    want = logits(plain, **gates)
    wrapped = peft.get_peft_model(
        plain, peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj", "down_proj"])
    )
    wmap = build_unit_map(wrapped)
    wparams = dict(wrapped.named_parameters())
    for (_, _, a), (_, _, b) in zip(wmap.slices(), plain_map.slices(), strict=True):
        assert a.param.startswith("base_model.model.")
        assert wparams[a.param] is plain_params[b.param]
        assert a.dim == b.dim and torch.equal(a.positions, b.positions)
    torch.testing.assert_close(logits(wrapped, **gates), want)


def test_unsupported_model_lists_modules_and_fix():
    model = T.AutoModelForCausalLM.from_config(
        T.BloomConfig(vocab_size=V, hidden_size=E, n_layer=1, n_head=H)
    )
    with pytest.raises(ValueError, match=r"(?s)'bloom'.*query_key_value.*register_architecture"):
        build_unit_map(model)


def test_config_disagreeing_with_weights_is_rejected():
    model = tiny("llama")
    model.config.num_key_value_heads = 4  # weights have 2 KV heads
    with pytest.raises(ValueError, match="k_proj"):
        build_unit_map(model)
