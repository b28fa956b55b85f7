"""A-GEM under DeepSpeed ZeRO against a plain single-process torch A-GEM, on real ranks.

Run by tests/test_agem.py on 2 ranks (CPU, gloo); also runs as one plain process (a world of 1):

    deepspeed --num_gpus 2 tests/scripts/agem_zero.py --out OUT.json --runs 0 1 2 3 2:bf16
    PYTHONPATH=. python tests/scripts/agem_zero.py --out OUT.json --runs 1

For each run (a ZeRO stage; ``2:bf16``: ZeRO 2 with bf16 weights and fp32 gradient accumulation,
whose compact gradient buffers must be dropped after the memory pass), in the same processes, it builds
the same tiny Llama on every rank (odd-sized biases, so ZeRO 3 pads and ZeRO 1/2 fragments straddle
ranks), hands DeepSpeed cltk's AdamW param groups (decay / no decay: two partitions per rank, stepped
one after the other), and trains STEPS steps with ``cltk.engine.train_step`` and a method whose
``before_step`` captures g_ref on this rank's memory micro-batches and whose ``after_backward``
projects (:class:`cltk.methods.agem.reference.AgemProjector`), with gradient accumulation and gradient
clipping on. Training and memory tokens come from disjoint halves of the vocabulary, so g and g_ref
conflict and the projection acts, except at step 0, where the memory loss is negated so that they
agree and g must pass unchanged.

The reference is one plain torch model and AdamW with the same groups: g is the gradient of the mean loss
over every rank's training micro-batches, g_ref that of every rank's memory batch, both projected by
:func:`cltk.methods.agem.projection.project_reference`, clipped like DeepSpeed and stepped. Rank 0 writes,
per ZeRO stage and step: the worst error of the gradient the engine's optimizer received (gathered from
both ranks' partitions, relative to its largest element), the coefficient on both sides, and the worst
weight error after the step (relative to the step's largest move).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from types import SimpleNamespace

import torch
import transformers as T

STEPS, GAS, MB, SEQ, VOCAB = 2, 2, 2, 16, 64
LR, WD, CLIP = 1e-2, 0.1, 0.5


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    config = T.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=36,
        head_dim=10,
        intermediate_size=45,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
    )
    return T.AutoModelForCausalLM.from_config(config)


def adamw(model: torch.nn.Module) -> torch.optim.Optimizer:
    from cltk.engine import param_groups

    return torch.optim.AdamW(param_groups(model, WD), lr=LR, betas=(0.9, 0.95), weight_decay=WD)


def batches(step: int, rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rank ``rank``'s training micro-batches and memory micro-batches at ``step`` (two memory
    micro-batches at step 0, so g_ref accumulates over them). Their tokens are disjoint halves of the
    vocabulary: learning one half's statistics raises the loss on the other, so g and g_ref conflict."""
    gen = torch.Generator().manual_seed(100 * step + rank)
    train = [torch.randint(0, VOCAB // 2, (MB, SEQ), generator=gen) for _ in range(GAS)]
    memory = [
        torch.randint(VOCAB // 2, VOCAB, (MB, SEQ), generator=gen) for _ in range(2 - min(step, 1))
    ]
    return train, memory


def memory_loss(step: int):
    from cltk.losses import causal_lm_loss

    if step == 0:  # a reference gradient that agrees with the training one: g must be left alone
        return lambda logits, labels: -causal_lm_loss(logits, labels)
    return causal_lm_loss


def full_weights(engine, stage: int) -> dict[str, torch.Tensor]:
    import deepspeed

    params = dict(engine.module.named_parameters())
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(params.values())):
            return {n: p.detach().float().clone() for n, p in params.items()}
    return {n: p.detach().float().clone() for n, p in params.items()}


class Capture:
    """The gradient the torch optimizer receives, per parameter, summed over ranks (each element is
    held by exactly one rank under ZeRO 1-3; by every rank under ZeRO 0)."""

    def __init__(self, view, shapes: dict[str, torch.Size]):
        self.view, self.shapes = view, shapes
        self.full: dict[str, torch.Tensor] = {}
        view.on_step(before=self.before)

    def reset(self) -> None:
        self.full = {n: torch.zeros(s.numel()) for n, s in self.shapes.items()}

    def before(self, stepped) -> None:
        for _, part in stepped:
            g = part.tensor.grad.detach().float().cpu().reshape(-1)
            for f in part.fragments:
                self.full[f.name][f.start : f.start + f.numel] = g[f.offset : f.offset + f.numel]

    def gathered(self) -> dict[str, torch.Tensor]:
        from cltk import distributed as dist

        if self.view.layout != "plain":
            for t in self.full.values():
                dist.all_reduce_sum(t)
        return {n: t.reshape(self.shapes[n]) for n, t in self.full.items()}


def reference_step(model, opt, step: int, world: int) -> tuple[dict[str, torch.Tensor], float]:
    """One plain A-GEM step on ``model``: returns the gradient handed to AdamW and the coefficient."""
    from cltk.forward import model_forward
    from cltk.losses import causal_lm_loss
    from cltk.methods.agem.projection import coefficient, project_reference

    params = [p for p in model.parameters()]
    forward = model_forward(model)

    def grad(loss_fn, data: list[list[torch.Tensor]]) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        count = sum(len(d) for d in data)
        for per_rank in data:
            for ids in per_rank:  # full batches: every micro-batch of every rank weighs the same
                (loss_fn(forward(ids), ids[:, 1:]) / count).backward()
        return torch.cat([p.grad.reshape(-1) for p in params]).clone()

    per_rank = [batches(step, r) for r in range(world)]
    # g: the mean over ranks of each rank's mean over its micro-batches; g_ref likewise (its scale does
    # not matter to the projection)
    g = grad(causal_lm_loss, [t for t, _ in per_rank])
    g_ref = grad(memory_loss(step), [m for _, m in per_rank])
    dot = float(torch.dot(g.double(), g_ref.double()))
    coef = coefficient(dot, float(torch.dot(g_ref.double(), g_ref.double())))
    g = project_reference(g, g_ref)
    norm = float(g.double().norm())
    if norm > CLIP:  # DeepSpeed: divide by (norm + 1e-6) / clip when that is > 1
        g = g / ((norm + 1e-6) / CLIP)
    out, offset = {}, 0
    for (name, p) in model.named_parameters():
        p.grad = g[offset : offset + p.numel()].reshape(p.shape).clone()
        out[name] = p.grad.clone()
        offset += p.numel()
    opt.step()
    return out, coef


def run(stage: int, rank: int, world: int, bf16: bool = False) -> dict:
    import deepspeed

    from cltk.engine import train_step
    from cltk.method import Method
    from cltk.methods.agem.reference import AgemProjector

    model = tiny_llama()
    config = {
        "train_micro_batch_size_per_gpu": MB,
        "gradient_accumulation_steps": GAS,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": CLIP,
        "steps_per_print": 10**9,
    }
    if bf16:  # bf16 weights, fp32 gradient accumulation: ZeRO 1/2's compact gradient buffers
        config.update(bf16={"enabled": True}, data_types={"grad_accum_dtype": "fp32"})
    engine, *_ = deepspeed.initialize(model=model, optimizer=adamw(model), config=config)
    projector = AgemProjector(engine)
    shapes = {
        n: torch.Size(getattr(p, "ds_shape", p.shape)) for n, p in engine.module.named_parameters()
    }
    capture = Capture(projector.view, shapes)

    class Agem(Method):
        name = "agem-test"
        result = None

        def before_step(self, ctx) -> None:
            projector.capture(batches(ctx.step, rank)[1], memory_loss(ctx.step))

        def after_backward(self, ctx) -> None:
            Agem.result = projector.project()

    ref_model = tiny_llama()
    ref_opt = adamw(ref_model)
    ctx = SimpleNamespace(engine=engine, stage=SimpleNamespace(name="agem"), step=0)
    out = {"stage": stage, "bf16": bf16, "layout": projector.view.layout, "steps": []}
    for step in range(STEPS):
        ctx.step = step
        before = full_weights(engine, stage)
        ref_before = {n: p.detach().clone() for n, p in ref_model.named_parameters()}
        start_err = max(float((before[n] - ref_before[n]).abs().max()) for n in before)
        capture.reset()
        train_step(ctx, [Agem()], batches(step, rank)[0])
        got = capture.gathered()
        want, want_coef = reference_step(ref_model, ref_opt, step, world)
        after = full_weights(engine, stage)
        scale = max(float(w.abs().max()) for w in want.values())
        move = max(float((after[n] - before[n]).abs().max()) for n in after)
        out["steps"].append({
            "step": step,
            "grad_err": max(float((got[n] - want[n]).abs().max()) for n in want) / scale,
            "grad_rel": float(torch.cat([(got[n] - want[n]).reshape(-1) for n in want]).norm()
                              / torch.cat([w.reshape(-1) for w in want.values()]).norm()),
            "coef": Agem.result.coef,
            "ref_coef": want_coef,
            "dot": Agem.result.dot,
            "start_weight_err": start_err,
            "weight_err": max(
                float((after[n] - p.detach()).abs().max()) for n, p in ref_model.named_parameters()
            ) / move,
            "micro_steps": engine.micro_steps,
            "global_steps": engine.global_steps,
        })
    engine.destroy()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--runs", nargs="+", default=["0", "1", "2", "3", "2:bf16"],
        help="ZeRO stages to run in turn; 'S:bf16' runs stage S with bf16 weights",
    )
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

    from cltk import distributed as cltk_dist

    deepspeed.init_distributed("gloo")
    cltk_dist.release_shm_names()  # leave /dev/shm as it was, whatever happens next
    cltk_dist.quiet_libraries()
    rank, world = tdist.get_rank(), tdist.get_world_size()
    results = []
    for spec in args.runs:
        stage, _, kind = spec.partition(":")
        stage = int(stage)
        t0 = time.perf_counter()
        res = run(stage, rank, world, bf16=kind == "bf16")
        res["seconds"] = time.perf_counter() - t0
        results.append(res)
        if rank == 0:
            for s in res["steps"]:
                name = f"{stage}{' bf16' if res['bf16'] else ''}"
                print(f"AGEM zero={name} step={s['step']} grad_err={s['grad_err']:.2e} "
                      f"rel={s['grad_rel']:.2e} "
                      f"coef={s['coef']:.4g} ref={s['ref_coef']:.4g} "
                      f"weight_err={s['weight_err']:.2e} ({res['seconds']:.1f} s)", flush=True)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "results": results}, f, indent=1)
    tdist.barrier()


if __name__ == "__main__":
    main()
