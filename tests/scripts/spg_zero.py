"""SPG under DeepSpeed ZeRO 1, 2 and 3 on real ranks: importance and masked updates against references.

Run by tests/test_spg_multirank.py on 2 ranks (CPU, gloo); also runs as one plain process:

    deepspeed --num_gpus 2 tests/scripts/spg_zero.py --out OUT.json --stages 1 2 3
    PYTHONPATH=. python tests/scripts/spg_zero.py --out OUT.json --stages 2

For each ZeRO stage, in the same processes, three engines in turn over the same tiny Llama (odd-sized
biases: ZeRO 3 pads them, ZeRO 1/2 fragments straddle the ranks), each with a torch AdamW (weight decay)
and gradient clipping, as ``cltk.engine`` builds them:

1. ``score``: one step on per-rank random tokens with SPG's hooks (``importance_steps: 1``); at the stage's
   end the importance is computed on the partitions. Every rank's saved tensors are gathered and merged
   into whole parameters and compared with the single-process reference: ``|tanh(standardise(g))|`` per
   tensor, ``g`` the plain model's gradient of the mean loss over all ranks' batches.
2. ``masked``: a new engine and a new SPG method restored from this rank's saved tensors (as the next stage
   does), one step on new tokens.
3. ``free``: the same step without SPG. Every element's move in 2 must be (1 - importance) times its move
   in 3.

Rank 0 writes, per ZeRO stage: the layout, the worst importance error, the worst miss of the masked
move (over the step size, lr), the free step's largest move (over lr) and the importance range.
"""

from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

import torch
import transformers as T

LR, WD = 1e-2, 0.1


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=36, head_dim=10, intermediate_size=45, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
    )
    return T.AutoModelForCausalLM.from_config(config)


def batch(rank: int, step: int) -> torch.Tensor:
    return torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1000 * rank + step))


def engine_for(stage: int):
    import deepspeed

    from cltk.engine import param_groups

    model = tiny_llama()
    opt = torch.optim.AdamW(param_groups(model, WD), lr=LR, weight_decay=WD)
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    return engine


def full_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().clone() for n, p in params.items()}
    return {n: p.detach().float().clone() for n, p in params.items()}


def step(engine, method, ctx, ids: torch.Tensor) -> None:
    """One optimizer step as ``cltk.engine.train_step`` runs it: backward, after_backward, step."""
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    if method is not None:
        method.after_backward(ctx)
    engine.step()


def reference_importance(world: int) -> dict[str, torch.Tensor]:
    from cltk.methods.spg.importance import importance

    model = tiny_llama()
    loss = sum(model(input_ids=batch(r, 0), labels=batch(r, 0)).loss for r in range(world)) / world
    loss.backward()
    return {n: importance(p.grad) for n, p in model.named_parameters()}


def run(stage: int, rank: int, world: int) -> dict:
    from cltk import distributed as dist
    from cltk.methods.spg import SpgConfig
    from cltk.methods.spg.method import SpgMethod
    from cltk.methods.spg.sharded import full_importance

    def context(engine, blocks: int):
        info = SimpleNamespace(block=0, blocks=blocks, name="d", domain="d")
        return SimpleNamespace(engine=engine, stage=info, schedule=range(1), step=0)

    # 1. score
    method = SpgMethod(None, SpgConfig(importance_steps=1))
    engine = engine_for(stage)
    ctx = context(engine, 1)
    method.on_engine_ready(ctx)
    layout = method.view.layout
    step(engine, method, ctx, batch(rank, 0))
    method.on_stage_end(ctx)
    saved = {k: v.cpu() for k, v in method.state_tensors().items()}
    engine.destroy()
    imp = full_importance(dist.all_gather_object(saved))
    ref = reference_importance(world)
    assert imp.keys() == ref.keys(), sorted(set(ref) ^ set(imp))
    imp_err = max(float((imp[n].view(r.shape) - r).abs().max()) for n, r in ref.items())

    # 2. masked: the next stage's engine, SPG restored from the saved tensors
    method2 = SpgMethod(None, SpgConfig(importance_steps=1))
    method2.load_state_tensors(saved)
    engine = engine_for(stage)
    ctx = context(engine, 2)  # not the domain's last block: no scoring, masking only
    method2.on_engine_ready(ctx)
    masked_numel = method2.blend.masked_numel
    before = full_weights(engine, stage)
    step(engine, method2, ctx, batch(rank, 1))
    masked = full_weights(engine, stage)
    method2.on_stage_end(ctx)
    engine.destroy()

    # 3. free
    engine = engine_for(stage)
    step(engine, None, None, batch(rank, 1))
    free = full_weights(engine, stage)
    engine.destroy()
    worst, free_max = 0.0, 0.0
    for n, w0 in before.items():
        d_free = free[n] - w0
        want = (1 - imp[n].view(w0.shape)) * d_free
        worst = max(worst, float((masked[n] - w0 - want).abs().max()))
        free_max = max(free_max, float(d_free.abs().max()))
    flat = torch.cat([t for t in imp.values()])
    return {
        "stage": stage,
        "layout": layout,
        "params": len(imp),
        "imp_err": imp_err,
        "move_err": worst / LR,
        "free_max": free_max / LR,
        "imp_min": float(flat.min()),
        "imp_max": float(flat.max()),
        "imp_mean": float(flat.mean()),
        "masked_numel_rank": masked_numel,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)  # one plain process: a world of 1
    if "MASTER_PORT" not in os.environ:
        from tests.multirank import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed
    import torch.distributed as tdist

    from cltk import distributed as dist

    deepspeed.init_distributed("gloo")
    dist.release_shm_names()  # leave /dev/shm as it was, whatever happens next
    rank, world = tdist.get_rank(), tdist.get_world_size()
    results = []
    for stage in args.stages:
        res = run(stage, rank, world)
        results.append(res)
        if rank == 0:
            print(f"SPG {json.dumps(res)}", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "results": results}, f, indent=1)
    dist.barrier()


if __name__ == "__main__":
    main()
