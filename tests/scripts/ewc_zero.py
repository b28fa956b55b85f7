"""EWC on real ranks under ZeRO 1, 2 and 3 (one engine after the other, in the same processes),
against one plain process.

Run by tests/test_ewc.py::test_two_ranks_under_zero_1_2_3_equal_one_process (CPU, gloo):

    deepspeed --num_gpus 2 tests/scripts/ewc_zero.py --out OUT.json --stages 1 2 3

Per ZeRO stage: stage A trains a tiny Llama (odd-sized biases: ZeRO 3 pads, ZeRO 1/2 fragments
straddle ranks) 3 steps on per-rank batches with the EWC hooks (Fisher window: the last 2 steps);
its Fisher and anchor, gathered from both ranks' partitions, are compared with plain torch on the
global batch (mean g * g of the averaged, clipped gradient; final weights). Stage B builds a new
engine from perturbed weights, takes 2 steps with the penalty on, and compares the gradient the
optimizer sees (captured right after the EWC hook), the reported penalty and the weights with
plain torch AdamW on CE + lam/2 sum F (theta - theta*)^2. At ZeRO 3 the ZeRO 2 run's state is
offered to the ZeRO 3 engine, which must refuse it. Rank 0 writes the worst relative errors and
this rank's EWC state size to OUT.
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

LR, WD, LAM, STEPS_A, STEPS_B, FISHER_STEPS, CLIP = 1e-2, 0.1, 300.0, 3, 2, 2, 1.0


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=64, hidden_size=36, head_dim=10, intermediate_size=45, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, attention_bias=True, mlp_bias=True,
    )
    return T.AutoModelForCausalLM.from_config(config)


def batch(step: int, rank: int, stage_b: bool) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1000 * stage_b + 10 * step + rank)
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


def gather(view, tensors: list[torch.Tensor], module) -> dict[str, torch.Tensor]:
    """Per-partition flat tensors of every rank -> ``module``'s full trainable parameters (each
    element sits on exactly one rank under ZeRO 1/2/3: a sum over ranks puts each in place)."""
    from cltk import distributed as dist
    from cltk.methods.kit.zero_view import full_shape

    shapes = {n: full_shape(p) for n, p in module.named_parameters() if p.requires_grad}
    full = {n: torch.zeros(s.numel()) for n, s in shapes.items()}
    for part, t in zip(view.partitions, tensors, strict=True):
        for f in part.fragments:
            piece = t.reshape(-1)[f.offset : f.offset + f.numel]
            full[f.name][f.start : f.start + f.numel] += piece.cpu()
    return {n: dist.all_reduce_sum(v).view(shapes[n]) for n, v in full.items()}


def stage_context(engine, steps: int, name: str) -> SimpleNamespace:
    """The parts of :class:`cltk.method.StageContext` the EWC hooks read."""
    stage = SimpleNamespace(name=name)
    return SimpleNamespace(engine=engine, step=0, schedule=range(steps), stage=stage)


def global_ce(model, step: int, world: int, stage_b: bool) -> torch.Tensor:
    """The loss DeepSpeed's averaged gradient belongs to: the mean over ranks of their mean CE."""
    ids = [batch(step, r, stage_b) for r in range(world)]
    return sum(model(input_ids=b, labels=b).loss for b in ids) / world


def rel_err(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = max(float((got[n] - want[n]).abs().max()) for n in want)
    return num / max(float(w.abs().max()) for w in want.values())


def run(stage: int, world: int, rank: int, old_method) -> tuple[dict, object]:
    from cltk.methods.ewc import EwcConfig
    from cltk.methods.ewc.method import EwcMethod, EwcStateError
    from cltk.methods.kit.zero_view import zero_view

    out: dict = {"stage": stage}
    # ----- stage A: Fisher and anchor -----------------------------------------------------------
    ref = tiny_llama()
    ref_opt = optimizer(ref)
    engine = engine_for(tiny_llama(), stage)
    method = EwcMethod(EwcConfig(lam=LAM, gamma=1.0, fisher_steps=FISHER_STEPS))
    ctx = stage_context(engine, STEPS_A, "A")
    method.on_engine_ready(ctx)
    fisher = {n: torch.zeros_like(p) for n, p in ref.named_parameters()}
    clipped: list[bool] = []  # DeepSpeed clips before the EWC hook sees g; so does the reference
    for step in range(STEPS_A):
        ctx.step = step
        ids = batch(step, rank, False)
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        global_ce(ref, step, world, False).backward()
        clipped.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)) > CLIP)
        if step >= STEPS_A - FISHER_STEPS:
            for n, p in ref.named_parameters():
                fisher[n] += p.grad**2 / FISHER_STEPS
        ref_opt.step()
        ref_opt.zero_grad()
    view = method.view
    method.on_stage_end(ctx)
    anchor = {n: p.detach().clone() for n, p in ref.named_parameters()}
    out["layout"] = view.layout
    out["fisher_rel_err"] = rel_err(gather(view, method.fisher, ref), fisher)
    out["anchor_rel_err"] = rel_err(gather(view, method.anchor, ref), anchor)
    out["fisher_max"] = max(float(f.max()) for f in fisher.values())
    # memory: this rank's F + theta* (bytes) against the model's trainable parameters
    out["state_bytes_rank"] = sum(4 * t.numel() for t in method.fisher + method.anchor)
    out["trainable"] = sum(p.numel() for p in ref.parameters())
    engine.destroy()

    # ----- stage B: the penalty, on a new engine from perturbed weights ------------------------
    with torch.no_grad():
        gen = torch.Generator().manual_seed(5)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ref_opt = optimizer(ref)
    engine = engine_for(copy.deepcopy(ref), stage)
    if old_method is not None:  # state made by another ZeRO layout must be refused, not misread
        try:
            old_method.on_engine_ready(stage_context(engine, STEPS_B, "B"))
            out["foreign_refused"] = False
        except EwcStateError:
            out["foreign_refused"] = True
    ctx = stage_context(engine, STEPS_B, "B")
    method.on_engine_ready(ctx)
    seen: list[torch.Tensor] = []
    grads = zero_view(engine)  # a second view: captures .grad right after the EWC hook ran
    grads.on_step(before=lambda parts: seen.extend((i, p.tensor.grad.clone()) for i, p in parts))
    grad_err, pen_err, pen_share = 0.0, 0.0, 0.0
    for step in range(STEPS_B):
        ctx.step = step
        ids = batch(step, rank, True)
        reported = float(method.extra_loss(ctx, {}, torch.zeros(1), torch.zeros(1))["ewc_penalty"])
        seen.clear()
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        got = gather(grads, [t for _, t in sorted(seen, key=lambda x: x[0])], ref)
        penalty = LAM / 2 * sum(
            (fisher[n] * (p - anchor[n]) ** 2).sum() for n, p in ref.named_parameters()
        )
        global_ce(ref, step, world, True).backward()
        clipped.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)) > CLIP)
        ce_grad = {n: p.grad.clone() for n, p in ref.named_parameters()}
        penalty.backward()
        want = {n: p.grad.clone() for n, p in ref.named_parameters()}
        grad_err = max(grad_err, rel_err(got, want))
        pen_share = max(pen_share, rel_err(ce_grad, want))  # how much the penalty changes g
        pen_err = max(pen_err, abs(reported / float(penalty.detach()) - 1))
        ref_opt.step()
        ref_opt.zero_grad()
    final = {n: p.detach() for n, p in ref.named_parameters()}
    parts = [p.tensor.detach() for p in method.view.partitions]
    weight_err = rel_err(gather(method.view, parts, ref), final)
    out.update(
        clipped_steps=sum(clipped),
        grad_rel_err=grad_err,
        penalty_rel_err=pen_err,
        weight_rel_err=weight_err,
        penalty_grad_share=pen_share,
    )
    method.on_stage_end(ctx)
    engine.destroy()
    return out, method


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    for key, value in (
        ("RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("LOCAL_RANK", "0"),
        ("MASTER_ADDR", "127.0.0.1"),
    ):
        os.environ.setdefault(key, value)  # one plain process: a world of 1
    if "MASTER_PORT" not in os.environ:
        from tests.multirank import free_port

        os.environ["MASTER_PORT"] = str(free_port())
    import deepspeed
    import torch.distributed as tdist

    from cltk import distributed as cltk_dist

    deepspeed.init_distributed("gloo")
    cltk_dist.release_shm_names()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    results, previous = [], None
    for stage in args.stages:
        t0 = time.perf_counter()
        res, method = run(stage, world, rank, previous if stage == 3 else None)
        res["seconds"] = round(time.perf_counter() - t0, 2)
        previous = method
        results.append(res)
        if rank == 0:
            print(f"EWC {json.dumps(res)}", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "results": results}, f, indent=1)
    tdist.barrier()


if __name__ == "__main__":
    main()
