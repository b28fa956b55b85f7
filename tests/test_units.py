"""Unit maps read from the model's structure, on tiny configs of many architectures: a zero gate
equals zeroed output-side weights, and the weights masks act on reach that unit and no other."""

from __future__ import annotations

import pytest
import torch
import transformers as T

from cltk.methods.das.masking import param_masks
from cltk.methods.das.units import (
    ArchSpec,
    UnitMapError,
    attach_gates,
    build_unit_map,
    register_architecture,
)

V, E, FFN, H = 64, 32, 48, 4
BASE = dict(
    vocab_size=V,
    hidden_size=E,
    intermediate_size=FFN,
    num_hidden_layers=2,
    num_attention_heads=H,
    num_key_value_heads=2,
    bos_token_id=0,
    eos_token_id=0,
    pad_token_id=0,
)
# q/k norms over all heads together couple the heads' q and k rows (checked on v and o only).
JOINT_QK_NORM = {"olmo2", "olmoe"}
MOE = dict(intermediate_size=12, num_experts_per_tok=2)
# model type (or name) -> (model type, overrides of BASE)
ARCHS = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),  # q/k/v biases
    "qwen3": ("qwen3", {"head_dim": 8}),
    "gemma": ("gemma", {"head_dim": 8}),
    "gemma2": ("gemma2", {"head_dim": 8}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "granite": ("granite", {}),
    "stablelm": ("stablelm", {}),
    "starcoder2": ("starcoder2", {}),
    "cohere": ("cohere", {}),
    "helium": ("helium", {"head_dim": 8}),
    "smollm3": ("smollm3", {}),
    "nemotron": ("nemotron", {}),  # up/down only (relu^2)
    "gptj": ("gptj", {"rotary_dim": 4, "num_key_value_heads": None}),
    "phi": ("phi", {}),
    "phi3": ("phi3", {}),  # fused q|k|v with GQA sizes, fused gate|up
    "glm": ("glm", {"head_dim": 8}),  # fused gate|up
    "gpt2": ("gpt2", {}),  # Conv1D, fused q|k|v
    "gpt_bigcode": ("gpt_bigcode", {}),  # multi-query attention, fused q|k|v
    "mpt": ("mpt", {}),
    "gpt_neox": ("gpt_neox", {}),  # fused, interleaved per head
    "bloom": ("bloom", {}),
    "persimmon": ("persimmon", {}),
    "falcon-mqa": ("falcon", {}),  # multi-query (Falcon-7B's layout)
    "falcon-gqa": ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}),
    "falcon-mha": ("falcon", {"multi_query": False}),  # interleaved per head
    "opt": ("opt", {"ffn_dim": FFN, "word_embed_proj_dim": E}),
    "mixtral": ("mixtral", {**MOE, "num_local_experts": 4}),
    "qwen2_moe": (
        "qwen2_moe",
        {
            "num_experts": 4,
            "moe_intermediate_size": 12,
            "shared_expert_intermediate_size": 16,
            "num_experts_per_tok": 2,
        },
    ),
    "qwen3_moe": (
        "qwen3_moe",
        {"num_experts": 4, "moe_intermediate_size": 12, "num_experts_per_tok": 2},
    ),
    "olmoe": ("olmoe", {**MOE, "num_experts": 4}),
    "granitemoe": ("granitemoe", {**MOE, "num_local_experts": 4}),
    "phimoe": ("phimoe", {**MOE, "num_local_experts": 4}),
    "gpt_oss": ("gpt_oss", {**MOE, "num_local_experts": 4, "head_dim": 8}),  # interleaved gate|up
}


def tiny(arch: str) -> torch.nn.Module:
    model_type, overrides = ARCHS[arch]
    kwargs = {k: v for k, v in {**BASE, **overrides}.items() if v is not None}
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(T.AutoConfig.for_model(model_type, **kwargs))
    # Random biases, so that a bias outside the map would show up in the checks below.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.normal_(0, 0.1)
    return model.eval()


def ids() -> torch.Tensor:
    return torch.randint(1, V, (2, 7), generator=torch.Generator().manual_seed(1))


def logits(model, umap, **gates) -> torch.Tensor:
    handles = attach_gates(model, umap, **gates)
    try:
        with torch.no_grad():
            return model(ids()).logits
    finally:
        for h in handles:
            h.remove()


def gates_off(umap, kind: str, units: list[int]) -> dict[str, torch.Tensor]:
    g = {"heads": torch.ones(2, umap.num_heads), "ffn": torch.ones(2, umap.intermediate)}
    g[kind][1, units] = 0.0
    return g


def group_of(umap, kind: str, unit: int) -> list[int]:
    """The units sharing weights with ``unit`` (a KV group's heads), all gated together."""
    if kind == "ffn":
        return [unit]
    r = umap.num_heads // umap.num_kv_heads
    return list(range(unit // r * r, unit // r * r + r))


def a_unit_that_matters(model, umap, kind: str) -> int:
    """A unit of layer 1 whose gate changes the logits (an expert the tiny batch routes to)."""
    n = umap.num_heads if kind == "heads" else umap.intermediate
    base = logits(model, umap)
    for unit in [1, 5, n // 3, n // 2 + 1, 2 * n // 3, n - 2]:
        if not torch.allclose(
            logits(model, umap, **gates_off(umap, kind, [unit])), base, atol=1e-5
        ):
            return unit
    raise AssertionError("no unit of layer 1 changes the output")


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    model = tiny(request.param)
    umap = build_unit_map(model)
    units = {kind: a_unit_that_matters(model, umap, kind) for kind in ("heads", "ffn")}
    return request.param, model, umap, units


@pytest.mark.parametrize("kind", ["heads", "ffn"])
def test_zeroed_output_side_equals_a_zero_gate(arch, kind):
    name, model, umap, units = arch
    assert umap.num_layers == 2 and umap.num_heads == H
    unit = units[kind]
    gated = logits(model, umap, **gates_off(umap, kind, [unit]))
    params = dict(model.named_parameters())
    saved = {n: p.detach().clone() for n, p in params.items()}
    slices = umap.layers[1].heads if kind == "heads" else umap.layers[1].ffn
    try:
        with torch.no_grad():
            for s in slices:
                if s.role in ("o", "out") and 0 <= unit - s.offset < len(s.members):
                    p = params[s.param]
                    vec = torch.ones(
                        p.shape[s.dims[0]]
                        if len(s.dims) == 1
                        else p.shape[s.dims[0]] * p.shape[s.dims[1]]
                    )
                    vec[s.positions[s.members[unit - s.offset]]] = 0.0
                    view = [p.shape[d] if d in s.dims else 1 for d in range(p.dim())]
                    p.mul_(vec.view(view))
        torch.testing.assert_close(logits(model, umap), gated, atol=2e-6, rtol=1e-5)
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(saved[n])


@pytest.mark.parametrize("kind", ["heads", "ffn"])
def test_masked_weights_reach_only_their_unit(arch, kind):
    """Noise on every element ``param_masks`` masks for a unit (importance 1 on its KV group):
    no effect while the group's gates are 0, a change when they are 1. Masks on input columns
    of q/k/v, or on another head's rows, would reach the other heads and fail the first check."""
    name, model, umap, units = arch
    unit = units[kind]
    group = group_of(umap, kind, unit)
    imp = {"heads": torch.zeros(2, umap.num_heads), "ffn": torch.zeros(2, umap.intermediate)}
    imp[kind][1, group] = 1.0
    masks = param_masks(model, imp, umap)
    if name in JOINT_QK_NORM and kind == "heads":
        for s in umap.layers[1].heads:
            if s.role in ("q", "k"):
                masks.pop(s.param, None)
    params = dict(model.named_parameters())
    off = gates_off(umap, kind, group)
    before_off, before_on = logits(model, umap, **off), logits(model, umap)
    touched = 0
    with torch.no_grad():
        for n, m in masks.items():
            hit = (1 - m).expand(params[n].shape)
            touched += int((hit > 0).sum())
            params[n].add_(torch.randn_like(params[n]) * hit)
    assert touched > 0
    torch.testing.assert_close(logits(model, umap, **off), before_off, atol=2e-6, rtol=1e-5)
    assert not torch.allclose(logits(model, umap), before_on, atol=1e-4)
    model.load_state_dict(tiny(name).state_dict())  # undo: the model is shared between tests


def test_counts_of_units_follow_the_structure():
    moe = build_unit_map(tiny("qwen2_moe"))  # 4 experts of 12 units, then a shared expert of 16
    assert moe.intermediate == 4 * 12 + 16
    assert [(g.start, g.count, g.param) for g in moe.layers[0].ffn_gates] == [
        (0, 48, "down_proj"),
        (48, 16, None),
    ]
    mqa = build_unit_map(tiny("gpt_bigcode"))
    assert (mqa.num_heads, mqa.num_kv_heads) == (H, 1)
    gqa = build_unit_map(tiny("llama"))
    k = next(s for s in gqa.layers[0].heads if s.role == "k")
    assert k.members.tolist() == [0, 0, 1, 1] and tuple(k.positions.shape) == (2, E // H)
    tied, untied = build_unit_map(tiny("gpt2")).tokens, build_unit_map(tiny("llama")).tokens
    assert tied.embed_param == tied.head_param == "transformer.wte.weight"
    assert (untied.embed_param, untied.head_param) == (
        "model.embed_tokens.weight",
        "lm_head.weight",
    )


def test_token_rows_are_masked_by_their_importance():
    model = tiny("gpt2")  # tied: the row takes the max of both importances
    umap = build_unit_map(model)
    imp = {
        "heads": torch.zeros(2, H),
        "ffn": torch.zeros(2, umap.intermediate),
        "embed": torch.zeros(V),
        "head": torch.zeros(V),
    }
    imp["embed"][3], imp["head"][3], imp["head"][9] = 0.4, 0.7, 0.2
    m = param_masks(model, imp, umap)["transformer.wte.weight"]
    assert m.shape == (V, 1)
    assert torch.allclose(m[[3, 9, 0], 0], torch.tensor([0.3, 0.8, 1.0]))
    assert "transformer.wte.weight" not in param_masks(model, imp, umap, tokens=False)


def test_peft_wrapped_model_maps_to_the_same_tensors():
    peft = pytest.importorskip("peft")
    plain = tiny("llama")
    plain_map = build_unit_map(plain)
    plain_params = dict(plain.named_parameters())
    gates = {"heads": torch.rand(2, H), "ffn": torch.rand(2, FFN)}
    want = logits(plain, plain_map, **gates)
    wrapped = peft.get_peft_model(
        plain, peft.LoraConfig(r=2, target_modules=["q_proj", "o_proj", "down_proj"])
    )
    wmap = build_unit_map(wrapped)
    wparams = dict(wrapped.named_parameters())
    for (_, _, a), (_, _, b) in zip(wmap.slices(), plain_map.slices(), strict=True):
        assert a.param.startswith("base_model.model.")
        assert wparams[a.param] is plain_params[b.param]
        assert a.dims == b.dims and torch.equal(a.positions, b.positions)
    torch.testing.assert_close(logits(wrapped, wmap, **gates), want)


def test_a_model_without_attention_is_refused_naming_the_part():
    model = T.AutoModelForCausalLM.from_config(
        T.MambaConfig(vocab_size=V, hidden_size=E, num_hidden_layers=1)
    )
    with pytest.raises(
        UnitMapError,
        match=r"(?s)'mamba'.*no attention module.*mixer.*"
        r"register_architecture",
    ):
        build_unit_map(model)


def test_registered_architecture_overrides_the_structure():
    model = tiny("gpt_neox")
    found = build_unit_map(model)
    register_architecture(
        "gpt_neox",
        ArchSpec(
            "gpt_neox.layers",
            "fused_neox",
            ("attention.query_key_value",),
            "attention.dense",
            ("mlp.dense_h_to_4h",),
            "mlp.dense_4h_to_h",
        ),
    )
    try:
        spec = build_unit_map(model)
    finally:
        from cltk.methods.das.units import ARCHITECTURES

        ARCHITECTURES.pop("gpt_neox")
    for (_, _, a), (_, _, b) in zip(found.slices(), spec.slices(), strict=True):
        assert (a.param, a.dims) == (b.param, b.dims) and torch.equal(a.positions, b.positions)


def test_config_disagreeing_with_weights_is_rejected():
    model = tiny("llama")
    model.config.num_attention_heads = 3  # o_proj reads 32 features
    with pytest.raises(UnitMapError, match="o_proj"):
        build_unit_map(model)
