"""DAS importance: proxy and LM scores, per-batch |grad| averaging, normalisation, files, ranks."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from cltk.methods.das.importance import (
    accumulate,
    estimate_importance,
    load_importance,
    normalize,
    save_importance,
)
from cltk.methods.das.units import build_unit_map
from tests.kit import tiny_llama

NUM_BATCHES, LM_SAMPLES = 8, 11


def build() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """The tiny dropout-free Llama and the batches every test here uses."""
    model = tiny_llama(intermediate_size=48)
    gen = torch.Generator().manual_seed(0)
    batches = [
        {"input_ids": torch.randint(0, 64, (2, 12), generator=gen)} for _ in range(NUM_BATCHES)
    ]
    return model, batches


def scores(model, batches) -> dict[str, torch.Tensor]:
    """Raw importance of both modes; ``lm`` stops at LM_SAMPLES sequences over all ranks."""
    proxy = estimate_importance(model, batches, mode="proxy", proxy_dropout=0.1)
    lm = estimate_importance(model, batches, mode="lm", num_samples=LM_SAMPLES)
    return {
        "proxy_heads": proxy["heads"],
        "proxy_ffn": proxy["ffn"],
        "lm_heads": lm["heads"],
        "lm_ffn": lm["ffn"],
    }


def test_proxy_is_finite_and_nonzero_on_a_dropout_free_llama():
    model, batches = build()
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())
    raw = estimate_importance(model, batches[:2], mode="proxy", proxy_dropout=0.1)
    umap = build_unit_map(model)
    assert raw["heads"].shape == (umap.num_layers, umap.num_heads)
    assert raw["ffn"].shape == (umap.num_layers, umap.intermediate)
    for k in ("heads", "ffn"):
        assert bool(torch.isfinite(raw[k]).all()) and bool((raw[k] > 0).all())
    # Token rows: the input embedding's rows score where their token occurs; every head row does.
    seen = torch.zeros(64, dtype=torch.bool)
    seen[torch.cat([b["input_ids"].flatten() for b in batches[:2]])] = True
    assert raw["embed"].shape == raw["head"].shape == (64,)
    assert bool((raw["embed"][seen] > 0).all()) and bool((raw["embed"][~seen] == 0).all())
    assert bool((raw["head"] > 0).all())
    # Without the dropout cltk adds, both passes of a dropout-free model are equal: nothing scores.
    flat = estimate_importance(model, batches[:2], mode="proxy", proxy_dropout=0.0)
    assert float(flat["heads"].abs().max()) < 1e-4 * float(raw["heads"].max())


def test_token_row_scores_are_gate_gradients():
    """|d loss / d gate_r| of a gate scaling row r equals |<W_r, d loss / d W_r>| (one batch)."""
    model, batches = build()
    ids = batches[0]["input_ids"]
    raw = estimate_importance(model, [{"input_ids": ids}], mode="lm")
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    for key, w in (("embed", model.model.embed_tokens.weight), ("head", model.lm_head.weight)):
        want = (w.detach() * w.grad).sum(-1).abs()
        torch.testing.assert_close(raw[key], want, rtol=1e-4, atol=1e-9)
    assert "embed" not in estimate_importance(model, [{"input_ids": ids}], mode="lm",
                                              tokens=False)


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "opt", "phi", "qwen2", "mixtral",
                                  "falcon-gqa"])
def test_every_mapped_architecture_scores(arch):
    from tests.test_units import tiny

    model = tiny(arch).train()  # the caller's mode is restored
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))
    for mode in ("proxy", "lm"):
        raw = estimate_importance(model, [{"input_ids": ids}], mode=mode)
        assert all(bool(torch.isfinite(t).all() and (t > 0).any()) for t in raw.values())
    assert model.training


def test_state_is_restored_and_parameters_untouched():
    model, batches = build()
    model.eval()
    model.model.embed_tokens.weight.requires_grad_(False)  # frozen parameters are fine
    ids = batches[0]["input_ids"]
    with torch.no_grad():
        before = model(ids).logits
    estimate_importance(model, batches[:1], mode="proxy")
    assert not model.training
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "embed" not in n)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():  # gates and dropout hooks are gone
        torch.testing.assert_close(model(ids).logits, before, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["lm", "proxy"])
def test_mean_over_samples_of_per_batch_abs(mode):
    """Two batches score the sample-weighted mean of each batch's |grad| (not a signed sum)."""
    model, batches = build()
    a = batches[0]
    b = {"input_ids": batches[1]["input_ids"][:1]}  # 1 sequence: unequal weights
    both = estimate_importance(model, [a, b], mode=mode)
    ra = estimate_importance(model, [a], mode=mode)
    rb = estimate_importance(model, [b], mode=mode)
    for k in both:
        torch.testing.assert_close(both[k], (2 * ra[k] + rb[k]) / 3, rtol=1e-5, atol=0)


def test_num_samples_cuts_the_last_batch():
    model, batches = build()
    cut = estimate_importance(model, batches, mode="lm", num_samples=3)
    explicit = estimate_importance(
        model, [batches[0], {"input_ids": batches[1]["input_ids"][:1]}], mode="lm"
    )
    for k in cut:
        torch.testing.assert_close(cut[k], explicit[k], rtol=1e-6, atol=0)


def test_padding_is_left_out():
    model, batches = build()
    ids = batches[0]["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, 8:] = 0
    padded = estimate_importance(model, [{"input_ids": ids, "attention_mask": mask}], mode="lm")
    garbage = ids.clone()
    garbage[:, 8:] = (garbage[:, 8:] + 7) % 64  # what the padding holds must not matter
    other = estimate_importance(model, [{"input_ids": garbage, "attention_mask": mask}], mode="lm")
    for k in padded:
        torch.testing.assert_close(padded[k], other[k], rtol=1e-5, atol=1e-9)


def test_bad_arguments_are_named():
    model, batches = build()
    with pytest.raises(ValueError, match="mode"):
        estimate_importance(model, batches, mode="fisher")
    with pytest.raises(ValueError, match="no samples"):
        estimate_importance(model, [], mode="lm")


def test_normalize_is_per_layer_and_in_unit_interval():
    gen = torch.Generator().manual_seed(0)
    raw = {"heads": torch.rand(3, 4, generator=gen), "ffn": torch.rand(3, 10, generator=gen)}
    raw["ffn"][1] = 0.5  # a constant layer
    norm = normalize(raw)
    for k in raw:
        assert norm[k].shape == raw[k].shape
        assert bool((norm[k] >= 0).all() and (norm[k] <= 1).all())
    assert bool((norm["ffn"][1] == 0).all())
    # Per layer: rescaling and shifting one layer changes nothing, anywhere.
    moved = {k: v.clone() for k, v in raw.items()}
    moved["heads"][2] = moved["heads"][2] * 1000 + 3
    moved["ffn"][0] = moved["ffn"][0] * 1e-3
    for k in raw:
        torch.testing.assert_close(normalize(moved)[k], norm[k], rtol=1e-4, atol=1e-5)
    # The unit furthest from its layer's mean scores highest in that layer.
    x = raw["heads"][0]
    assert int(norm["heads"][0].argmax()) == int((x - x.mean()).abs().argmax())


def test_accumulate_is_elementwise_max():
    a = {"heads": torch.tensor([[0.2, 0.9]]), "ffn": torch.tensor([[0.5, 0.1, 0.0]])}
    b = {"heads": torch.tensor([[0.4, 0.1]]), "ffn": torch.tensor([[0.3, 0.6, 0.0]])}
    acc = accumulate(accumulate(None, a), b)
    for k in a:
        assert torch.equal(acc[k], torch.maximum(a[k], b[k]))
    # Token rows accumulate the same way; a file without them (older runs) keeps the new ones.
    ta, tb = {**a, "embed": torch.tensor([0.1, 0.8])}, {**b, "embed": torch.tensor([0.5, 0.2])}
    assert torch.equal(accumulate(ta, tb)["embed"], torch.tensor([0.5, 0.8]))
    assert torch.equal(accumulate(a, tb)["embed"], tb["embed"])
    with pytest.raises(ValueError, match="shapes differ"):
        accumulate(a, {"heads": torch.zeros(1, 3), "ffn": b["ffn"]})


def test_save_load_roundtrip_and_errors(tmp_path):
    model, _ = build()
    umap = build_unit_map(model)
    imp = {
        "heads": torch.rand(umap.num_layers, umap.num_heads),
        "ffn": torch.rand(umap.num_layers, umap.intermediate),
        "embed": torch.rand(64),
        "head": torch.rand(64),
    }
    path = tmp_path / "importance.safetensors"
    save_importance(path, imp)
    assert set(load_file(path)) == {"heads", "ffn", "embed", "head"}
    back = load_importance(path, model=model)
    for k in imp:
        assert torch.equal(back[k], imp[k])
    with pytest.raises(FileNotFoundError, match="no importance file"):
        load_importance(tmp_path / "missing.safetensors", model=model)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]"):
        save_importance(tmp_path / "raw.safetensors", {k: v * 5 for k, v in imp.items()})
    with pytest.raises(ValueError, match="another model"):
        save_importance(tmp_path / "v.safetensors", {**imp, "embed": torch.rand(65)})
        load_importance(tmp_path / "v.safetensors", model=model)
    wrong = {"heads": torch.rand(umap.num_layers, umap.num_heads + 1), "ffn": imp["ffn"]}
    save_importance(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(ValueError, match="another model"):
        load_importance(tmp_path / "wrong.safetensors", model=model)


def importance_on_ranks() -> dict[str, torch.Tensor]:
    """Rank r scores batches r, r + world, ...; every rank must end with the same scores."""
    from cltk import distributed as dist

    model, batches = build()
    result = scores(model, batches[dist.rank() :: dist.world_size()])
    for other in dist.all_gather_object(result):  # every rank holds the result, not only rank 0
        for k, v in other.items():
            torch.testing.assert_close(v, result[k], rtol=0, atol=0)
    return result


@pytest.mark.multirank
@pytest.mark.on_two_ranks("importance_on_ranks")
def test_two_ranks_equal_one_process(on_two_ranks):
    model, batches = build()
    one = scores(model, batches)
    assert set(on_two_ranks) == set(one)
    for k in one:
        assert bool((one[k] > 0).all())
        torch.testing.assert_close(on_two_ranks[k], one[k], rtol=1e-5, atol=0)
