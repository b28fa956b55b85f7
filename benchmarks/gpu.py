"""Everything cltk claims for GPUs, in one command on one GPU (under 8 minutes on an H100), one page.

    bash benchmarks/gpu.sh [--page docs/benchmarks/gpu.md]

Parts, each under its own time limit, in order:

1. the GPU-marked tests (``pytest -m gpu tests/test_gpu.py``): NCCL collectives of every method, bf16;
2. throughput (``benchmarks/throughput.py``): SmolLM2-135M (the offline GGUF) and a 1.24B Llama-3.2-1B
   shaped model built from a config, bf16, tokens/s per GPU and MFU with and without activation
   checkpointing, peak device memory against ``cltk plan --memory``'s estimate;
3. overhead (``benchmarks/overhead.py``): cltk's step, non-finite guard included, against a
   hand-written DeepSpeed loop and the HF Trainer, on the quickstart model and on SmolLM2's shape.

Without a CUDA GPU every part is reported as skipped and the page says that no GPU has run it; the
device, the versions and the command are written either way. Exit code: 0 when every part that ran
passed (skips included), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (name, arguments of the script, time limit in seconds): 475 s at most in all, with the tests' limit
THROUGHPUT = [
    ("SmolLM2-135M", ["--model", "smollm2", "--seq", "2048", "--micro", "8"], 75),
    ("Llama 1.24B (config)", ["--model", "llama1b", "--seq", "2048", "--micro", "4"], 110),
]
OVERHEAD = [
    ("quickstart model (hidden 256, 4 layers)", [], 25),
    ("SmolLM2 shape (hidden 576, 30 layers), 8 x 1024 tokens",
     ["--set", "model.config.hidden_size=576", "--set", "model.config.num_hidden_layers=30",
      "--set", "model.config.intermediate_size=1536", "--set", "model.config.num_attention_heads=9",
      "--set", "model.config.num_key_value_heads=3", "--set", "data.seq_len=1024",
      "--set", "model.config.max_position_embeddings=2048"], 40),
]
TESTS_LIMIT = 225


def versions() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "CUDA": str(torch.version.cuda), "deepspeed": deepspeed.__version__,
           "transformers": transformers.__version__}
    try:
        import flash_attn

        out["flash-attn"] = flash_attn.__version__
    except ImportError:
        out["flash-attn"] = "not installed"
    return out


def device_name() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return f"{p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible"


def run(cmd: list[str], limit: int) -> tuple[str, str]:
    """(status, output tail) of a subprocess under a time limit."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")}
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return f"timed out after {limit} s", out[-3000:]
    status = "passed" if p.returncode == 0 else f"failed (exit {p.returncode})"
    return f"{status} in {time.monotonic() - t0:.0f} s", (p.stdout + p.stderr)[-3000:]


def tests_part(gpu: str | None) -> tuple[list[str], bool]:
    if gpu is None:
        return ["skipped: no CUDA GPU on this machine"], True
    status, out = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu",
                       "tests/test_gpu.py"], TESTS_LIMIT)
    summary = [ln for ln in out.splitlines() if " passed" in ln or " failed" in ln or "error" in ln]
    return [f"{status}: {summary[-1] if summary else 'no summary'}"], status.startswith("passed")


def throughput_part(gpu: str | None, dry_run: bool = False) -> tuple[list[str], bool]:
    from cltk.memplan import GIB, gib

    lines, ok = [], True
    for name, argv, limit in THROUGHPUT:
        lines.append(f"### {name}\n")
        if dry_run:  # the page's plumbing on a CPU: a tiny model in place of each
            argv, limit = ["--model", "tiny", "--seq", "64", "--micro", "2", "--steps", "1",
                           "--rounds", "1"], 300
            lines.append("CPU dry run: a tiny model stands in; these are not GPU figures.\n")
        elif gpu is None:
            lines.append("skipped: no CUDA GPU on this machine\n")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            js = Path(tmp) / "t.json"
            status, out = run([sys.executable, "benchmarks/throughput.py", *argv, "--json", str(js)],
                              limit)
            if not js.is_file():
                ok = False
                lines.append(f"{status}\n\n```\n{out[-1500:]}\n```\n")
                continue
            r = json.loads(js.read_text())
        lines.append(f"{r['parameters']:,} parameters, {r['precision']}, {r['optimizer']}, ZeRO "
                     f"{r['zero']}, {r['attention']} attention, {r['micro_batch']} x {r['seq_len']} "
                     f"tokens per step ({status}).\n")
        lines.append("| arm | step | tokens/s per GPU | MFU | peak memory | plan's estimate |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        for row in r["rows"]:
            mfu = f"{100 * row['mfu']:.1f}%" if row["mfu"] is not None else "n/a"
            lines.append(f"| {row['arm']} | {row['step_s'] * 1e3:.0f} ms | {row['tokens_per_s']:,.0f} "
                         f"| {mfu} | {gib(row['peak_memory_gib'] * GIB)} | {gib(row['plan_gib'] * GIB)} |")
        lines.append("")
    return lines, ok


def overhead_part(gpu: str | None) -> tuple[list[str], bool]:
    lines, ok = [], True
    for name, argv, limit in OVERHEAD:
        lines.append(f"### {name}\n")
        if gpu is None:
            lines.append("skipped: no CUDA GPU on this machine\n")
            continue
        status, out = run([sys.executable, "benchmarks/overhead.py", "--steps", "3", "--rounds", "2",
                           *argv], limit)
        ok &= status.startswith("passed")
        table = [ln for ln in out.splitlines() if ln.startswith("|") or "ratio" in ln or "loss" in ln]
        lines.append(f"{status}\n")
        lines += table or ["```", out[-1500:], "```"]
        lines.append("")
    return lines, ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--page", default=str(ROOT / "docs" / "benchmarks" / "gpu.md"))
    ap.add_argument("--dry-run-on-cpu", action="store_true",
                    help="without a GPU, run the throughput part on a tiny model (tests the page)")
    args = ap.parse_args()
    t0 = time.monotonic()
    gpu = device_name()
    v = versions()
    tests, ok_t = tests_part(gpu)
    tp, ok_p = throughput_part(gpu, dry_run=args.dry_run_on_cpu and gpu is None)
    oh, ok_o = overhead_part(gpu)
    minutes = (time.monotonic() - t0) / 60
    head = ["# cltk on one GPU", ""]
    if gpu is None:
        head += ["**No GPU has run this page yet.** It was written on a machine without a CUDA GPU: "
                 "every GPU part below is skipped. Run the command on a GPU node to fill it in.", ""]
    head += [
        "Written by `bash benchmarks/gpu.sh` (benchmarks/gpu.py; each part's own command is in its "
        "script's docstring).", "",
        f"- device: {gpu or f'none: CPU only ({platform.machine()}, {os.cpu_count()} cores)'}",
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- wall time: {minutes:.1f} min",
        "",
        "## GPU-marked tests", "", *tests, "",
        "## Throughput, MFU and memory: activation checkpointing off and on", "",
        "MFU counts the model's FLOPs (`6 N + 12 L h T` per token, the recomputation not counted) "
        "over the device's dense bf16 peak. Peak memory is `torch.cuda.max_memory_allocated`; the "
        "plan's estimate is `cltk plan --memory` for the same setup less its CUDA-context allowance. "
        "The aim: 45% MFU for the 1B model at the hand-written DeepSpeed loop's speed.", "",
        *tp,
        "## Overhead: cltk's step (non-finite guard included) against a DeepSpeed loop and the "
        "HF Trainer", "", *oh,
    ]
    Path(args.page).parent.mkdir(parents=True, exist_ok=True)
    Path(args.page).write_text("\n".join(head).rstrip() + "\n")
    print(f"wrote {args.page} ({minutes:.1f} min)")
    return 0 if (ok_t and ok_p and ok_o) else 1


if __name__ == "__main__":
    sys.exit(main())
