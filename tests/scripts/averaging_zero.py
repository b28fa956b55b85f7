"""merge: and ema: on real ranks under ZeRO 1, 2 and 3 (one engine after the other, in the same
processes), against exports merged by hand and a plain-torch EMA.

Run by tests/test_averaging.py::test_two_ranks_under_zero_1_2_3 (CPU, gloo):

    deepspeed --num_gpus 2 tests/scripts/averaging_zero.py --out OUT.json --stages 1 2 3

Per ZeRO stage: an engine over a tiny Llama (odd-sized biases: ZeRO 3 pads, ZeRO 1/2 fragments
straddle ranks) with the merge and EMA hooks; its export (``save_pretrained``'s state dict, gathered
under ZeRO 3) before training is ``before``; 5 AdamW steps on per-rank batches, beside a plain-torch
AdamW on the global batch (clipped like DeepSpeed) that keeps its own EMA (every 2nd step); the export then is ``after``.
``merge.export`` must leave the export equal to ``(1 - a) * before + a * after`` computed by hand on the
two state dicts, the fp32 master weights equal to it, every rank's model equal to it (the next forward
uses it), and a forward through the engine equal to one through a plain model loaded with it;
``ema.export`` must then leave the export equal to the plain-torch EMA. Rank 0 writes the worst
relative errors to OUT.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from types import SimpleNamespace

import torch
import transformers as T

LR, WD, STEPS, ALPHA, DECAY, EVERY, CLIP = 1e-2, 0.1, 5, 0.3, 0.6, 2, 1.0


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=36, head_dim=10, intermediate_size=45, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
    )
    return T.AutoModelForCausalLM.from_config(config)


def batch(step: int, rank: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(10 * step + rank)
    return torch.randint(0, 64, (2, 16), generator=gen)


def optimizer(model):
    from cltk.engine import param_groups

    return torch.optim.AdamW(param_groups(model, WD), lr=LR, weight_decay=WD)


def engine_for(model, stage: int):
    import deepspeed

    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer(model), config=config)
    return engine


def exported(engine) -> dict[str, torch.Tensor] | None:
    """What the loop's default export saves (cltk.continual.ContinualRun._export): rank 0's."""
    from cltk import distributed as dist

    if engine.zero_optimization_stage() == 3:
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = engine.module.state_dict()
    return {k: v.detach().float().clone() for k, v in sd.items()} if dist.is_main() else None


def own_model(engine) -> dict[str, torch.Tensor]:
    """This rank's model parameters (gathered under ZeRO 3), as every rank holds them."""
    import deepspeed

    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params],
                                           enabled=engine.zero_optimization_stage() == 3):
        return {n: p.detach().float().clone() for n, p in params}


def master(engine) -> dict[str, torch.Tensor]:
    """The fp32 master weights, gathered (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).clone() for n, p in engine.module.named_parameters()}


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = max(float((got[n] - want[n]).abs().max()) for n in want)
    return num / max(float(w.abs().max()) for w in want.values())


def equal_on_ranks(d: dict[str, torch.Tensor]) -> bool:
    from cltk import distributed as dist

    flat = torch.cat([d[k].reshape(-1) for k in sorted(d)])
    everyone = dist.all_gather_cat(flat.reshape(1, -1))
    return bool((everyone == everyone[:1]).all())


def run(stage: int, world: int, rank: int) -> dict:
    from cltk.methods.ema import EmaConfig
    from cltk.methods.ema.method import EmaMethod
    from cltk.methods.merge import MergeConfig
    from cltk.methods.merge.method import MergeMethod

    out: dict = {"stage": stage}
    ref = tiny_llama()
    ref_opt = optimizer(ref)
    engine = engine_for(tiny_llama(), stage)
    ctx = SimpleNamespace(engine=engine, step=0, stage=SimpleNamespace(index=0, dirname="0-x"))
    merge = MergeMethod(MergeConfig(alpha=ALPHA))
    ema = EmaMethod(EmaConfig(decay=DECAY, every=EVERY))
    merge.on_engine_ready(ctx)
    ema.on_engine_ready(ctx)
    before = exported(engine)
    ref_ema = {n: p.detach().clone() for n, p in ref.named_parameters()}
    for step in range(STEPS):
        ctx.step = step
        ids = batch(step, rank)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        ids_all = [batch(step, r) for r in range(world)]
        (sum(ref(input_ids=b, labels=b).loss for b in ids_all) / world).backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)  # as DeepSpeed clips
        ref_opt.step()
        ref_opt.zero_grad()
        if (step + 1) % EVERY == 0:
            with torch.no_grad():
                for n, p in ref.named_parameters():
                    ref_ema[n] = DECAY * ref_ema[n] + (1 - DECAY) * p
    after = exported(engine)
    trained = {n: p.detach() for n, p in ref.named_parameters()}
    out["layout"] = merge.view.layout
    out["ema_updates"] = ema.updates
    # this rank's merge + EMA state against the model: each a copy of this rank's partitions
    out["state_bytes_rank"] = sum(4 * t.numel() for t in merge.before + ema.average)
    out["trainable"] = sum(p.numel() for p in ref.parameters())

    merge.export(ctx)  # -> (1 - a) * before + a * after, on every rank's partitions and model
    merged, fp32, mine = exported(engine), master(engine), own_model(engine)
    probe = batch(99, 0)
    with torch.no_grad():
        logits = engine(input_ids=probe).logits.float()
    if rank == 0:
        want = {k: (1 - ALPHA) * before[k] + ALPHA * after[k] for k in before}
        out["trained_rel_err"] = rel_err({k: after[k] for k in trained}, trained)
        out["moved"] = rel_err(before, after)  # training moved the weights: the test means something
        out["merge_export_rel_err"] = rel_err(merged, want)
        out["merge_master_rel_err"] = rel_err(fp32, want)
        out["merge_model_rel_err"] = rel_err(mine, want)
        plain = copy.deepcopy(ref)
        plain.load_state_dict(want)
        with torch.no_grad():
            out["merge_forward_rel_err"] = rel_err({"x": logits}, {"x": plain(input_ids=probe).logits})
    out["merge_model_equal_on_ranks"] = equal_on_ranks(mine)

    ema.export(ctx)  # -> the average
    averaged, fp32 = exported(engine), master(engine)
    if rank == 0:
        out["ema_export_rel_err"] = rel_err(averaged, ref_ema)
        out["ema_master_rel_err"] = rel_err(fp32, ref_ema)
        out["ema_vs_trained"] = rel_err(ref_ema, trained)  # the average is not the last weights
    out["ema_model_equal_on_ranks"] = equal_on_ranks(own_model(engine))
    engine.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    import deepspeed
    import torch.distributed as tdist

    from cltk import distributed as cltk_dist

    deepspeed.init_distributed("gloo")
    cltk_dist.release_shm_names()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    results = []
    for stage in args.stages:
        t0 = time.perf_counter()
        res = run(stage, world, rank)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results.append(res)
        if rank == 0:
            print(f"AVERAGING {json.dumps(res)}", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "results": results}, f, indent=1)
    tdist.barrier()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
