"""Run logs: rank-0 log lines, ``metrics.csv`` (+ TensorBoard when installed), and the per-rank audit log
of trained sequence ids. On resume both files are cut back to the restored position, so they describe
exactly the steps that the final model has been trained on.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path
from typing import Any

from cltk import distributed as dist

COLUMNS = [
    "stage",
    "stage_name",
    "step",
    "loss",
    "loss_main",
    "lr",
    "tokens_per_s",
    "seconds",
    "extra",
]


def log(msg: str) -> None:
    """A line from rank 0 only."""
    if dist.is_main():
        print(f"[cltk {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _keep(row_stage: int, row_step: int, stage: int, step: int) -> bool:
    return (row_stage, row_step) < (stage, step)


class Tracker:
    """Writes metrics (rank 0) and, optionally, the sequence ids each rank trains."""

    def __init__(self, out: Path, log_sequence_ids: bool):
        self.out = Path(out)
        self.metrics_path = self.out / "metrics.csv"
        self.ids_path = self.out / "sequence_ids" / f"rank{dist.rank()}.jsonl"
        self.log_ids = log_sequence_ids
        self.tb = None
        if dist.is_main():
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(self.out / "tensorboard"))
            except ImportError:  # TensorBoard is optional
                self.tb = None

    def truncate(self, stage: int, step: int) -> None:
        """Drop records of (stage, step) at or after the resume position."""
        if dist.is_main() and self.metrics_path.is_file():
            with open(self.metrics_path) as f:
                rows = [
                    r
                    for r in csv.DictReader(f)
                    if _keep(int(r["stage"]), int(r["step"]), stage, step)
                ]
            self._write_rows(rows, "w")
        if self.log_ids and self.ids_path.is_file():
            records = [json.loads(ln) for ln in self.ids_path.read_text().splitlines() if ln]
            lines = [json.dumps(r) for r in records if _keep(r["stage"], r["step"], stage, step)]
            self.ids_path.write_text("".join(ln + "\n" for ln in lines))

    def _write_rows(self, rows: list[dict[str, Any]], mode: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        new = mode == "w" or not self.metrics_path.is_file()
        with open(self.metrics_path, mode if not new else "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                w.writeheader()
            w.writerows(rows)

    def step(
        self,
        stage: int,
        stage_name: str,
        step: int,
        metrics: dict[str, float],
        tokens: int,
        seconds: float,
    ) -> None:
        if dist.is_main():
            extra = {k: v for k, v in metrics.items() if k not in COLUMNS}
            row = {
                "stage": stage,
                "stage_name": stage_name,
                "step": step,
                "loss": f"{metrics['loss']:.6f}",
                "loss_main": f"{metrics.get('loss_main', metrics['loss']):.6f}",
                "lr": f"{metrics['lr']:.3e}",
                "tokens_per_s": f"{tokens / max(seconds, 1e-9):.1f}",
                "seconds": f"{seconds:.4f}",
                "extra": json.dumps(extra) if extra else "",
            }
            self._write_rows([row], "a")
            if self.tb is not None:
                for k, v in metrics.items():
                    self.tb.add_scalar(f"{stage_name}/{k}", v, step)

    def sequence_ids(self, stage: int, step: int, ids: list[tuple[int, int]]) -> None:
        if self.log_ids:
            self.ids_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.ids_path, "a") as f:
                f.write(json.dumps({"stage": stage, "step": step, "ids": ids}) + "\n")


def peak_memory_mb() -> dict[str, float]:
    """This process's peak memory so far: resident set (``rss``, host) and, on an accelerator, the
    most device memory torch has held allocated (``device``), in MiB."""
    import resource

    import torch

    out = {"rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0}  # Linux: KiB
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["device"] = torch.cuda.max_memory_allocated() / 2**20
    return out
