"""Overhead of cltk's training step: against a hand-written DeepSpeed loop and transformers' Trainer.

    python benchmarks/overhead.py [--steps 6 --rounds 4]                 # one process (CPU or GPU)
    deepspeed --num_gpus 2 benchmarks/overhead.py [--steps 6 --rounds 4]  # 2 ranks

Three arms train the same model on the same batches under the same DeepSpeed config, side by side in
one run:

* ``cltk``: the engine cltk builds (:func:`cltk.engine.build_engine`) and its step
  (:func:`cltk.engine.train_step`, no method): forward with ``logits_to_keep``, cltk's loss, backward,
  the non-finite guard (one all-reduce and one host copy per optimizer step), ``engine.step()``.
* ``DeepSpeed loop``: the least a DeepSpeed user writes: ``deepspeed.initialize`` with the same config
  dict, then per micro-batch ``loss = engine(input_ids=x, labels=x).loss``, ``engine.backward(loss)``,
  ``engine.step()``; no logging, no check, no host sync.
* ``HF Trainer``: ``transformers.Trainer`` with ``TrainingArguments(deepspeed=<the same dict>)``, the
  same micro-batch, accumulation, clipping and precision, on a dataset of the same token rows (read
  in order, so each rank gets the very micro-batches the other arms train on); logging, saving and
  evaluation off (``logging_strategy/save_strategy/eval_strategy="no"``, no reporters, no tqdm), every
  other setting at its default.

Same work per step: each arm's model comes from ``cltk.models.build_model`` (same class, same seeded
init); the DeepSpeed config is the one cltk derives from the run config
(:func:`cltk.ds_config.deepspeed_config`: the JSON plus micro-batch, accumulation, global batch and
clipping), and the script prints any key in which the engines' configs differ (the Trainer adds
``zero_allow_untested_optimizer``, a permission flag that changes no work). Every arm uses AdamW with
cltk's settings (``train.lr``, ``train.betas``, eps 1e-8, ``train.weight_decay`` on matrices, none on
1-D weights; ``DeepSpeedCPUAdam`` in AdamW mode where the config offloads the optimizer, as cltk does)
and a constant LR through a ``LambdaLR`` (cltk's ``build_engine`` gets ``lr_fn=1``, the Trainer
``lr_scheduler_type="constant"``): the schedule's shape only changes a float, not the work.

Differences that remain, and belong to what is measured: cltk's head computes the T-1 positions that
have a next token (``logits_to_keep``) where the other two compute T and drop one in the loss, and
cltk's loss is its own chunked cross-entropy (transformers' ``ForCausalLMLoss`` in the others); the
Trainer additionally counts the labelled tokens of each step (``num_items_in_batch``: an all-gather
across ranks per step), checks each micro-batch's loss for NaN/inf (``logging_nan_inf_filter``,
default on), reads the gradient norm (a host copy per step) and runs its callbacks.

On a machine without an accelerator (DeepSpeed's CPU accelerator, gloo) the Trainer gets
``use_cpu=True``. Without it accelerate finds no distributed backend for the CPU, so its state counts
one process whatever the launcher started; at 2 ranks the Trainer then computes a global batch of
micro-batch x accumulation x 1 and refuses the DeepSpeed config's ``train_batch_size`` (one process
happens to work). With ``use_cpu=True`` accelerate takes the world size from the process group (gloo)
and the Trainer still hands the model to DeepSpeed (its engine is a ``DeepSpeedEngine``, ZeRO as
configured). On a GPU ``use_cpu`` stays off, the usual DeepSpeed path.

Timing: random token ids (step time does not depend on the text), ``--steps`` optimizer steps per arm
per round, the arms in a rotated order each round, round 0 a warm-up; every step starts after a
barrier and ends after the device finishes (``get_accelerator().synchronize()``). The Trainer drives
its own loop, so the whole run happens inside one ``Trainer.train()``: a callback runs the other two
arms' blocks between the Trainer's blocks, and a Trainer step is timed from the end of the previous
step's callbacks to its ``on_step_end`` (its data loading, token count and loss checks included).
Printed (rank 0): the median step, its quartiles and tokens/s (all ranks' tokens) per arm, and the
ratio of cltk's tokens/s to each arm's; and the first step's loss of each arm (same init and batch:
equal up to rounding). ``--set KEY=VALUE`` overrides the config (default the quickstart's: Llama hidden
256, 4 layers, micro-batch 8 x 128 tokens, ZeRO 2; bf16 on a GPU that supports it, fp32 on CPU).
"""

from __future__ import annotations

import argparse
import atexit
import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from _common import VocabOnly  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
ARMS = ("cltk", "DeepSpeed loop", "HF Trainer")
EPS = 1e-8  # torch's AdamW default, which cltk uses


def _constant(step: int) -> float:
    return 1.0


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys (dotted) whose values differ between two DeepSpeed config dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=6, help="timed optimizer steps per arm per round")
    ap.add_argument("--rounds", type=int, default=4, help="timed rounds (after one warm-up round)")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def _optimizer(ds_cfg: dict, t) -> tuple[type, dict]:
    """cltk's AdamW (DeepSpeedCPUAdam in AdamW mode where the optimizer is offloaded) and its settings."""
    import torch

    offload = ds_cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        opt_cls, opt_kw = DeepSpeedCPUAdam, {"adamw_mode": True}
    else:
        opt_cls, opt_kw = torch.optim.AdamW, {}
    opt_kw.update(lr=t.lr, betas=tuple(t.betas), eps=EPS, weight_decay=t.weight_decay)
    return opt_cls, opt_kw


def _deepspeed_loop(cfg, tok, ds_cfg: dict, opt_cls: type, opt_kw: dict):
    """The hand-written DeepSpeed loop's engine: ``deepspeed.initialize`` with the same config dict."""
    import deepspeed
    import torch

    from cltk.engine import param_groups
    from cltk.models import build_model

    model = build_model(cfg, tok)
    opt = opt_cls(param_groups(model, cfg.train.weight_decay), **opt_kw)
    loop, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=opt,
        lr_scheduler=torch.optim.lr_scheduler.LambdaLR(opt, _constant),
        config=copy.deepcopy(ds_cfg),
    )
    return loop


def _loop_step(loop, micro: list) -> list:
    """The least a DeepSpeed user writes per micro-batch: forward, backward, step."""
    losses = []
    for x in micro:
        x = x.to(loop.device)
        loss = loop(input_ids=x, labels=x).loss
        loop.backward(loss)
        loop.step()
        losses.append(loss.detach())
    return losses


class _Arms:
    """The run's token rows, the steppers of the cltk and DeepSpeed-loop arms, and what they measure:
    per arm the timed steps and the first step's loss."""

    def __init__(self, args, ids, rank: int, world: int, gas: int, mb: int, steppers: dict):
        self.args, self.ids, self.rank, self.world, self.gas, self.mb = args, ids, rank, world, gas, mb
        self.steppers = steppers
        self.times: dict[str, list[float]] = {a: [] for a in ARMS}
        self.first_loss: dict[str, float] = {}

    def micro_batches(self, k: int) -> list:
        """Step k's micro-batches of this rank; global micro-batch g = (step * gas + j) * world + rank
        is the order in which the Trainer's sharded sequential loader hands them out."""
        import torch

        gs = [(k * self.gas + j) * self.world + self.rank for j in range(self.gas)]
        return [torch.as_tensor(self.ids[g * self.mb : (g + 1) * self.mb]) for g in gs]

    def global_mean(self, losses: list) -> float:
        import torch

        from cltk import distributed as dist

        return float(dist.all_reduce_sum(torch.stack(losses).sum().reshape(1)) / (len(losses) * self.world))

    def block(self, rnd: int, arm: str) -> None:
        from deepspeed.accelerator import get_accelerator

        from cltk import distributed as dist

        for i in range(self.args.steps):
            k = rnd * self.args.steps + i
            micro = self.micro_batches(k)
            dist.barrier()
            t0 = time.perf_counter()
            out = self.steppers[arm](micro)
            get_accelerator().synchronize()
            dt = time.perf_counter() - t0
            if rnd:
                self.times[arm].append(dt)
            if k == 0:
                self.first_loss[arm] = out["loss"] if arm == "cltk" else self.global_mean(out)

    def others(self, rnd: int, before: bool) -> None:
        """The round's blocks of the other arms that come before / after the Trainer's."""
        o = list(ARMS[rnd % 3 :] + ARMS[: rnd % 3])
        i = o.index("HF Trainer")
        for arm in o[:i] if before else o[i + 1 :]:
            self.block(rnd, arm)


def _trainer_args(cfg, ds_cfg: dict, n_steps: int, out_dir: str):
    """The Trainer's settings: the same DeepSpeed dict, batch, optimizer settings and clipping; a
    constant LR; sequential reading; logging, saving and evaluation off."""
    from deepspeed.accelerator import get_accelerator
    from transformers import TrainingArguments

    t = cfg.train
    return TrainingArguments(
        output_dir=out_dir,
        deepspeed=copy.deepcopy(ds_cfg),
        use_cpu=get_accelerator().device_name() == "cpu",
        per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        max_steps=n_steps,
        learning_rate=t.lr,
        adam_beta1=t.betas[0],
        adam_beta2=t.betas[1],
        adam_epsilon=EPS,
        weight_decay=t.weight_decay,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=t.grad_clip,
        bf16=bool(ds_cfg.get("bf16", {}).get("enabled")),
        fp16=bool(ds_cfg.get("fp16", {}).get("enabled")),
        seed=cfg.seed,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        dataloader_pin_memory=get_accelerator().device_name() != "cpu",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        disable_tqdm=True,
    )


def _train_with_trainer(cfg, tok, ds_cfg: dict, n_steps: int, optimizer: tuple, arms: _Arms):
    """transformers' Trainer: its loop drives the run; the callback times its steps and runs the other
    arms' blocks between its own. Returns the Trainer's engine."""
    import torch
    from deepspeed.accelerator import get_accelerator
    from transformers import PrinterCallback, Trainer, TrainerCallback

    from cltk import distributed as dist
    from cltk.models import build_model

    ids, steps, rounds, world = arms.ids, arms.args.steps, arms.args.rounds, arms.world

    class Rows(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x = torch.as_tensor(ids[i])
            return {"input_ids": x, "labels": x}

    class Driver(TrainerCallback):
        t0 = 0.0

        def start(self) -> None:
            dist.barrier()
            self.t0 = time.perf_counter()

        def on_train_begin(self, args_, state, control, **kw):
            arms.others(0, before=True)
            self.start()

        def on_step_end(self, args_, state, control, **kw):
            get_accelerator().synchronize()
            dt = time.perf_counter() - self.t0
            k = state.global_step - 1
            rnd = k // steps
            if rnd:
                arms.times["HF Trainer"].append(dt)
            if k == 0:
                # the step's summed micro-batch losses (each over the global token count x world):
                # the rank's share of the global mean times world; a private attribute, hence getattr
                tr = getattr(trainer, "_tr_loss", None)
                tr = torch.full((1,), float("nan")) if tr is None else tr.detach().reshape(1).clone()
                arms.first_loss["HF Trainer"] = float(dist.all_reduce_sum(tr) / world)
            if (k + 1) % steps == 0:
                arms.others(rnd, before=False)
                if rnd < rounds:
                    arms.others(rnd + 1, before=True)
            self.start()

    out_dir = tempfile.mkdtemp(prefix="cltk-overhead-")  # the Trainer's output_dir; nothing is saved
    atexit.register(shutil.rmtree, out_dir, True)  # also when an arm fails
    trainer = Trainer(
        model=build_model(cfg, tok),
        args=_trainer_args(cfg, ds_cfg, n_steps, out_dir),
        train_dataset=Rows(),
        callbacks=[Driver()],
        # the AdamW that optim="adamw_torch" builds from the adam_* arguments above, named outright so
        # that an offloaded optimizer is DeepSpeedCPUAdam as in cltk (Trainer's own decay grouping)
        optimizer_cls_and_kwargs=(optimizer[0], dict(optimizer[1])),
    )
    trainer.remove_callback(PrinterCallback)  # the final train_runtime line; no other logs are made
    trainer.train()
    return trainer.model_wrapped


def _report(args, engines: dict, arms: _Arms, gas: int, mb: int, seq: int) -> None:
    """Rank 0's table: per arm the median step, its quartiles, tokens/s and cltk's ratio; the first
    step's losses; how each engine's DeepSpeed config differs from cltk's."""
    times, world, engine = arms.times, arms.world, engines["cltk"]
    med = {a: statistics.median(v) for a, v in times.items()}
    quart = {a: statistics.quantiles(v, n=4) if len(v) > 1 else [v[0]] * 3 for a, v in times.items()}
    tokens = world * gas * mb * seq
    n_params = sum(p.numel() for p in engine.module.parameters())
    prec = "bf16" if engine.bfloat16_enabled() else "fp16" if engine.fp16_enabled() else "fp32"
    print(
        f"\n{world} rank(s), device {engine.device}, ZeRO {engine.zero_optimization_stage()}, {prec}; "
        f"{n_params / 1e6:.2f}M parameters; {gas} micro-batch(es) of {mb} x {seq} tokens per rank "
        f"per step ({tokens} tokens per step); {args.rounds} rounds x {args.steps} steps per arm"
    )
    print("| arm | median step (s) | quartiles (s) | tokens/s | cltk / arm (tokens/s) |")
    print("|---|---:|---:|---:|---:|")
    for a in ARMS:
        q = quart[a]
        print(
            f"| {a} | {med[a]:.4f} | {q[0]:.4f}-{q[2]:.4f} | {tokens / med[a]:,.0f} "
            f"| {med[a] / med['cltk']:.3f}x |"
        )
    print("first step's loss: " + ", ".join(f"{a} {arms.first_loss[a]:.5f}" for a in ARMS))
    base = engine._config._param_dict
    for a in ("DeepSpeed loop", "HF Trainer"):
        diff = _config_diff(base, engines[a]._config._param_dict)
        print(f"DeepSpeed config, cltk -> {a}: " + ("; ".join(diff) if diff else "identical"))


def main() -> None:
    args = _parse_args()

    import numpy as np

    from cltk import distributed as dist
    from cltk.ds_config import deepspeed_config
    from cltk.engine import build_engine, train_step
    from cltk.method import StageContext
    from cltk.models import build_model
    from cltk.validate import load_config

    dist.init()
    rank, world = dist.rank(), dist.world_size()
    cfg = load_config(args.config, overrides=args.set, world_size=world)
    t = cfg.train
    mb, gas, seq = t.micro_batch_size, t.gradient_accumulation_steps, cfg.data.seq_len
    vocab = int((cfg.model.config or {}).get("vocab_size") or cfg.tokenizer.train.vocab_size)
    tok = VocabOnly(vocab)
    n_steps = args.steps * (args.rounds + 1)
    # every step's token rows, the same on every rank (see _Arms.micro_batches)
    ids = np.random.default_rng(cfg.seed).integers(0, vocab, (n_steps * gas * world * mb, seq))
    ds_cfg = deepspeed_config(cfg, world, dist.bf16_available())  # what build_engine hands DeepSpeed
    opt_cls, opt_kw = _optimizer(ds_cfg, t)

    engine = build_engine(cfg, build_model(cfg, tok), n_steps, lr_fn=_constant)  # (a) cltk
    ctx = StageContext(cfg, None, [], {}, None, Path("."), None, engine=engine)
    loop = _deepspeed_loop(cfg, tok, ds_cfg, opt_cls, opt_kw)  # (b) the hand-written DeepSpeed loop
    steppers = {
        "cltk": lambda micro: train_step(ctx, [], micro),
        "DeepSpeed loop": lambda micro: _loop_step(loop, micro),
    }
    arms = _Arms(args, ids, rank, world, gas, mb, steppers)
    hf = _train_with_trainer(cfg, tok, ds_cfg, n_steps, (opt_cls, opt_kw), arms)  # (c) the Trainer

    if dist.is_main():
        _report(args, {"cltk": engine, "DeepSpeed loop": loop, "HF Trainer": hf}, arms, gas, mb, seq)
    dist.barrier()
    for e in (engine, loop, hf):
        e.destroy()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
