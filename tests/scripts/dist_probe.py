"""Stand-in for ``cltk train`` in launcher tests: joins torch.distributed, all-reduces, reports.

Use (under any launcher that sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT):
    deepspeed --num_gpus 2 tests/scripts/dist_probe.py --out DIR [--resume] [--ds-configs A.json]

Each rank prints ``probe rank=R world=W ... host=H sum=S resume=True|False`` and appends that
record as one JSON line to ``DIR/rank<R>.jsonl`` (appending: a requeued job leaves a second line).
Rank 0 then writes ``DIR/checkpoints/latest``, as a cltk run does: a resubmission sees it.
Plain torch.distributed with gloo: no DeepSpeed init, so no shm op compile. With ``--ds-configs``
each DeepSpeed JSON also trains a tiny model for 4 steps under a client AdamW, handed over as cltk
does (its "auto" bf16 resolved to off, as on CPU); the record gets each one's ZeRO stage and losses.
"""

import argparse
import json
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def ds_steps(path: str) -> dict:
    import deepspeed

    cfg = json.loads(Path(path).read_text())
    cfg["bf16"]["enabled"] = False
    # The keys cltk writes into every config it hands DeepSpeed.
    cfg.update(
        train_micro_batch_size_per_gpu=4,
        gradient_accumulation_steps=1,
        train_batch_size=4 * dist.get_world_size(),
        gradient_clipping=1.0,
    )
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    x = torch.randn(4, 8)
    losses = []
    for _ in range(4):  # the same batch: the loss must fall if updates are applied
        loss = (engine(x) - x.sum(1, keepdim=True)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"stage": engine.zero_optimization_stage(), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ds-configs", nargs="*", default=[])
    parser.add_argument("--local_rank", type=int, default=None)  # the deepspeed launcher passes it
    args = parser.parse_args()

    dist.init_process_group("gloo", timeout=timedelta(seconds=120))  # env:// from the launcher
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)  # every rank reached every other, not only the rendezvous store
    record = {
        "rank": rank,
        "world": world,
        "local_rank": int(os.environ.get("LOCAL_RANK", "-1")),
        "host": socket.gethostname(),
        "sum": total.item(),
        "resume": args.resume,
        "job": os.environ.get("SLURM_JOB_ID"),
        "restart": os.environ.get("SLURM_RESTART_COUNT"),
        "omp_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    print("probe " + " ".join(f"{k}={v}" for k, v in record.items()), flush=True)
    record["ds"] = {path: ds_steps(path) for path in args.ds_configs}
    if args.ds_configs:  # DeepSpeed's comm set up its CPU shm buffers: unlink their names
        from cltk.distributed import release_shm_names

        release_shm_names()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"rank{rank}.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    dist.barrier()
    if rank == 0:
        (out / "checkpoints").mkdir(exist_ok=True)
        (out / "checkpoints" / "latest").write_text("probe\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
