"""What scoring a downstream task costs on 1 rank and on N: wall time and forwards per rank, plain and ZeRO 3.

    python benchmarks/tasks.py --model DIR [--ranks 2] [--limit 40]

Scores ``kjv_cloze`` (tasks/) on a saved model through :func:`cltk.tasks.evaluate_tasks`, once on one
process and once on ``--ranks`` ranks (deepspeed launcher, gloo on CPU), each time with a full copy per rank
(``plain``, as ZeRO 0/1/2 stages and ``cltk eval`` score) and partitioned by a ZeRO-3 engine (``zero3``, as
row 0 and ZeRO-3 stages score), and prints one table: seconds, forwards per rank (ZeRO 3: with the
lockstep's one-token forwards), and the accuracy (the same everywhere).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(model_dir: str, limit: int, out: Path) -> None:
    import deepspeed
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cltk import distributed as dist
    from cltk import tasks

    dist.init()
    made = []
    make = tasks.make_lm
    tasks.make_lm = lambda *a, **k: made.append(make(*a, **k)) or made[-1]
    tok = AutoTokenizer.from_pretrained(model_dir)
    settings = tasks.TaskSettings(("kjv_cloze",), (str(ROOT / "tasks"),), limit, None, 8)
    rows = {}
    for mode in ("plain", "zero3"):
        model = AutoModelForCausalLM.from_pretrained(model_dir).requires_grad_(False)
        if mode == "zero3":
            model, *_ = deepspeed.initialize(model=model, config={
                "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}})
            model = model.module
        dist.barrier()
        t0 = time.perf_counter()
        scores = tasks.evaluate_tasks(model, tok, settings, zero3=mode == "zero3")
        seconds = time.perf_counter() - t0
        rows[mode] = {"s": seconds, "forwards": dist.all_gather_object(made[-1].forwards),
                      "acc": scores["kjv_cloze"]["value"]}
    if dist.is_main():
        out.write_text(json.dumps(rows))
    dist.barrier()
    torch.distributed.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--limit", type=int, default=40)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.model, a.limit, Path(a.worker))
    from cltk.distributed import free_port

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, a.ranks):
            out = Path(tmp) / f"{n}.json"
            args = [__file__, "--model", a.model, "--limit", str(a.limit), "--worker", str(out)]
            cmd = ([sys.executable] if n == 1 else
                   [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(n),
                    "--master_port", str(free_port())])
            subprocess.run(cmd + args, env=env, check=True, capture_output=True)
            res[n] = json.loads(out.read_text())
    print(f"kjv_cloze, limit {a.limit}, model {a.model}")
    print("| ranks | mode | seconds | vs 1 rank | forwards per rank | acc |")
    print("|---|---|---:|---:|---|---:|")
    for n, rows in res.items():
        for mode, r in rows.items():
            print(f"| {n} | {mode} | {r['s']:.1f} | {r['s'] / res[1][mode]['s']:.2f}x | "
                  f"{', '.join(map(str, r['forwards']))} | {r['acc']:.3f} |")


if __name__ == "__main__":
    main()
