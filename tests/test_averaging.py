"""merge: and ema: (docs/merge.md, docs/ema.md): their settings, and their arithmetic on real ranks
under ZeRO 1, 2 and 3 against exports merged by hand and a plain-torch EMA. Kill and resume through
the whole loop: tests/test_averaging_resume.py."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from cltk.config import ConfigError
from cltk.methods.merge import MergeConfig
from cltk.validate import load_config
from tests.kit import ODD_SIZES, tiny_llama
from tests.kit.zero import ds_config, full_weights, rel_err
from tests.tiny_run import write_tiny_run


def test_merge_weights_fixed_and_running_mean():
    assert [MergeConfig(alpha=0.3).weight(i) for i in range(3)] == [0.3, 0.3, 0.3]
    assert [MergeConfig(mode="mean").weight(i) for i in range(3)] == [1.0, 0.5, 1 / 3]
    assert [MergeConfig(mode="mean", count_start=True).weight(i) for i in range(2)] == [0.5, 1 / 3]
    # the running mean: m_i = m_{i-1} + (x_i - m_{i-1}) / i is the mean of x_1..x_i
    xs, m = [4.0, 1.0, 7.0], 0.0
    for i, x in enumerate(xs):
        a = MergeConfig(mode="mean").weight(i)
        m = (1 - a) * m + a * x
    assert m == pytest.approx(sum(xs) / 3)


@pytest.mark.parametrize(
    "sections, ds, key, words",
    [
        ({"merge": {"alpha": 0.0}}, None, "merge.alpha", "(0, 1]"),
        ({"merge": {"alpha": 1.5}}, None, "merge.alpha", "(0, 1]"),
        ({"merge": {"mode": "mean", "alpha": 0.3}}, None, "merge.alpha", "leave alpha out"),
        ({"merge": {"mode": "median"}}, None, "merge.mode", "'fixed', 'mean'"),
        ({"ema": {"decay": 1.0}}, None, "ema.decay", "[0, 1)"),
        ({"ema": {"every": 0}}, None, "ema.every", ">= 1"),
        ({"merge": {}, "lora": {"r": 4}}, None, "merge", "adapter per domain"),
        ({"ema": {}, "lora": {"r": 4}}, None, "ema", "frozen base"),
        ({"ema": {}}, {"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "ema",
         "ZeRO stage 1, 2 or 3"),
    ],
)
def test_bad_settings_are_refused_at_load_naming_the_key(tmp_path, sections, ds, key, words):
    cfg = write_tiny_run(tmp_path, **sections)
    if ds is not None:
        (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(ConfigError) as e:
        load_config(cfg, world_size=1)
    assert str(e.value).startswith(f"{key}:") and words in str(e.value)


def test_good_settings_load(tmp_path):
    run = write_tiny_run(tmp_path, merge={"mode": "mean"}, ema={"decay": 0.95, "every": 2})
    cfg = load_config(run, world_size=1)
    assert cfg.sections["merge"].weight(1) == 0.5 and cfg.sections["ema"].every == 2


# ----- two ranks, ZeRO 1, 2 and 3: the arithmetic against hand merges and a plain-torch EMA -------
# Per ZeRO stage: an engine over the tiny Llama of odd sizes (ZeRO 3 pads, ZeRO 1/2 fragments
# straddle the ranks) with the merge and EMA hooks; its export (``save_pretrained``'s state dict,
# gathered under ZeRO 3) before training is ``before``; 5 AdamW steps on per-rank batches, beside a
# plain-torch AdamW on the global batch (clipped like DeepSpeed) that keeps its own EMA (every 2nd
# step); the export then is ``after``. ``merge.export`` must leave the export equal to ``(1 - a) *
# before + a * after`` computed by hand on the two state dicts, the fp32 master weights equal to it,
# every rank's model equal to it (the next forward uses it), and a forward through the engine equal
# to one through a plain model loaded with it; ``ema.export`` must then leave the export equal to
# the plain-torch EMA.
LR, WD, STEPS, ALPHA, DECAY, EVERY, CLIP = 1e-2, 0.1, 5, 0.3, 0.6, 2, 1.0


def _tiny() -> torch.nn.Module:
    return tiny_llama(0, vocab_size=64, **ODD_SIZES)


def _ids(step: int, rank: int) -> torch.Tensor:
    return torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(10 * step + rank))


def _adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    from cltk.engine import param_groups

    return torch.optim.AdamW(param_groups(model, WD), lr=LR, weight_decay=WD)


def _exported(engine) -> dict[str, torch.Tensor] | None:
    """What the loop's default export saves (cltk.continual.ContinualRun._export): rank 0's."""
    from cltk import distributed as dist

    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict()
    return {k: v.detach().float().clone() for k, v in sd.items()} if dist.is_main() else None


def _master(engine) -> dict[str, torch.Tensor]:
    """The fp32 master weights, gathered (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def _equal_on_ranks(d: dict[str, torch.Tensor]) -> bool:
    from cltk import distributed as dist

    everyone = dist.all_gather_cat(torch.cat([d[k].reshape(-1) for k in sorted(d)]).reshape(1, -1))
    return bool((everyone == everyone[:1]).all())


def _train_beside_plain_torch(engine, ctx, ref: torch.nn.Module) -> dict[str, torch.Tensor]:
    """STEPS steps of the engine (on this rank's batches) and of ``ref`` (on the global batch,
    clipped as DeepSpeed clips); returns the plain-torch EMA of ``ref``'s weights."""
    from cltk import distributed as dist

    rank, world = dist.rank(), dist.world_size()
    ref_opt = _adamw(ref)
    ref_ema = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for step in range(STEPS):
        ctx.step = step
        ids = _ids(step, rank)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        everyone = [_ids(step, r) for r in range(world)]
        (sum(ref(input_ids=b, labels=b).loss for b in everyone) / world).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        ref_opt.step()
        ref_opt.zero_grad()
        if (step + 1) % EVERY == 0:
            with torch.no_grad():
                for n, p in ref.named_parameters():
                    ref_ema[n] = DECAY * ref_ema[n] + (1 - DECAY) * p
    return ref_ema


def _merged(engine, ref, before, after) -> dict:
    """After ``merge.export``: its errors against ``(1 - a) * before + a * after`` (rank 0's)."""
    merged, fp32, mine = _exported(engine), _master(engine), full_weights(engine)
    probe = _ids(99, 0)
    with torch.no_grad():
        logits = engine(input_ids=probe).logits.float()
    out = {"merge_model_equal_on_ranks": _equal_on_ranks(mine)}
    if before is not None:  # rank 0
        want = {k: (1 - ALPHA) * before[k] + ALPHA * after[k] for k in before}
        out.update(merge_export_rel_err=rel_err(merged, want),
                   merge_master_rel_err=rel_err(fp32, want),
                   merge_model_rel_err=rel_err(mine, want))
        plain = copy.deepcopy(ref)
        plain.load_state_dict(want)
        with torch.no_grad():
            plain_logits = plain(input_ids=probe).logits
        out["merge_forward_rel_err"] = rel_err({"x": logits}, {"x": plain_logits})
    return out


def _engine(model: torch.nn.Module, stage: int):
    import deepspeed

    config = ds_config(stage, micro_batch=2, gradient_clipping=CLIP)
    return deepspeed.initialize(model=model, optimizer=_adamw(model), config=config)[0]


def averaging_under_zero(stage: int) -> dict:
    from cltk.methods.ema import EmaConfig
    from cltk.methods.ema.method import EmaMethod
    from cltk.methods.merge.method import MergeMethod

    ref, engine = _tiny(), _engine(_tiny(), stage)
    ctx = SimpleNamespace(engine=engine, step=0, stage=SimpleNamespace(index=0, dirname="0-x"))
    merge = MergeMethod(MergeConfig(alpha=ALPHA))
    ema = EmaMethod(EmaConfig(decay=DECAY, every=EVERY))
    merge.on_engine_ready(ctx)
    ema.on_engine_ready(ctx)
    before = _exported(engine)
    ref_ema = _train_beside_plain_torch(engine, ctx, ref)
    after = _exported(engine)
    trained = {n: p.detach() for n, p in ref.named_parameters()}
    out = {"stage": stage, "layout": merge.view.layout, "ema_updates": ema.updates,
           # this rank's merge + EMA state against the model: each a copy of this rank's partitions
           "state_bytes_rank": sum(4 * t.numel() for t in merge.before + ema.average),
           "trainable": sum(p.numel() for p in ref.parameters())}
    if before is not None:  # rank 0: trained like plain AdamW, and training moved the weights
        out.update(trained_rel_err=rel_err({k: after[k] for k in trained}, trained),
                   moved=rel_err(before, after))
    merge.export(ctx)  # -> (1 - a) * before + a * after, on every rank's partitions and model
    out.update(_merged(engine, ref, before, after))
    ema.export(ctx)  # -> the average
    averaged, fp32 = _exported(engine), _master(engine)
    if averaged is not None:
        out.update(ema_export_rel_err=rel_err(averaged, ref_ema),
                   ema_master_rel_err=rel_err(fp32, ref_ema),
                   ema_vs_trained=rel_err(ref_ema, trained))  # the average is not the last weights
    out["ema_model_equal_on_ranks"] = _equal_on_ranks(full_weights(engine))
    engine.destroy()
    return out


def averaging_under_zero_1_2_3() -> list[dict]:
    from cltk import distributed as dist

    return [{**averaging_under_zero(stage), "world": dist.world_size()} for stage in (1, 2, 3)]


@pytest.mark.multirank
@pytest.mark.on_two_ranks("averaging_under_zero_1_2_3")
def test_two_ranks_under_zero_1_2_3(on_two_ranks):
    assert [(r["world"], r["stage"]) for r in on_two_ranks] == [(2, 1), (2, 2), (2, 3)]
    for r in on_two_ranks:
        print(r)
        assert r["layout"] == ("zero3" if r["stage"] == 3 else "zero1/2"), r
        assert r["trained_rel_err"] < 5e-5 and r["moved"] > 1e-2, r  # trained like plain AdamW
        # merged: the hand interpolation of the two exports, to fp32 rounding, everywhere it lives
        for key in ("export", "master", "model", "forward"):
            assert r[f"merge_{key}_rel_err"] < 1e-6, (key, r)
        assert r["merge_model_equal_on_ranks"] and r["ema_model_equal_on_ranks"], r
        # EMA: the plain-torch EMA of the same steps (2 updates), not the last weights
        assert r["ema_updates"] == 2 and r["ema_vs_trained"] > 1e-2, r
        assert r["ema_export_rel_err"] < 5e-5 and r["ema_master_rel_err"] < 5e-5, r
        # memory: each rank holds half of the two copies (plus ZeRO's padding)
        assert r["state_bytes_rank"] < 2 * 4 * r["trainable"] * 0.55, r
