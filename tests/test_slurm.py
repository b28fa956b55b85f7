"""The SLURM job scripts on a real local SLURM cluster (tests/slurm_cluster.py): one node (and a
requeue that resumes from the checkpoint), and two nodes in network namespaces.

The jobs launch short real cltk runs (tests/tiny_run.py) through the scripts' default command.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, cluster_fixture
from tests.tiny_run import write_tiny_run

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
slurm1 = cluster_fixture(nodes=1)
slurm2 = cluster_fixture(nodes=2)


def job_env(out: Path, config: Path, **extra: str) -> dict[str, str]:
    """What the job scripts launch (a real cltk run of ``config``), and where the run's output goes."""
    return {
        "CLTK_CONFIG": str(config),
        "CLTK_OUT": str(out),
        "NPROC_PER_NODE": "2",
        # sbatch hands the submitter's environment to the job: the venv must be on PATH there.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra,
    }


def submit(cluster: SlurmCluster, script: str, env: dict[str, str], out: Path, *opts: str) -> str:
    # No GPUs here: override the scripts' --gpus-per-node, as on any CPU cluster.
    args = ["--gpus-per-node=0", f"--output={out.parent}/slurm-%j.out", *opts, f"launch/{script}"]
    return cluster.sbatch(args, env=env, cwd=str(ROOT))


def wait(cluster: SlurmCluster, job: str, restarts: int = 0) -> dict[str, str]:
    info = cluster.wait(job, timeout=420, restarts=restarts)
    log = Path(info["StdOut"])
    return {**info, "log": log.read_text() if log.exists() else "(no job log)"}


def finished(cluster: SlurmCluster, job: str, restarts: int = 0) -> dict[str, str]:
    info = wait(cluster, job, restarts)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"job {job}: {info['JobState']} {info['ExitCode']}\n{info['log'][-4000:]}\n{cluster.logs()}"
    )
    return info


def steps_trained(out: Path, rank: int) -> list[tuple[int, int]]:
    lines = (out / "sequence_ids" / f"rank{rank}.jsonl").read_text().splitlines()
    return [(r["stage"], r["step"]) for r in map(json.loads, lines)]


def test_single_node_job_killed_mid_stage_resumes_when_requeued(slurm1, tmp_path):
    out = tmp_path / "out"
    cfg = write_tiny_run(
        tmp_path, train={"checkpoint_every": 2, "log_sequence_ids": True, "max_steps_per_stage": 4}
    )
    # rank 1 is SIGKILLed after step 3 of stage 1 (once per output dir): the job fails, no hang
    job = submit(slurm1, "slurm_single.sbatch", job_env(out, cfg, CLTK_KILL_AT="1:3:1"), out)
    info = wait(slurm1, job)
    assert info["JobState"] == "FAILED", info["log"][-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "s01-step000002"
    assert not (out / "forgetting.json").exists()

    # A requeued job (same environment and output dir) resumes from the last checkpoint and finishes.
    slurm1.run(["scontrol", "requeue", job])
    info = finished(slurm1, job, restarts=1)
    assert "resumed from checkpoint s01-step000002 at step 2" in info["log"]
    report = json.loads((out / "forgetting.json").read_text())
    assert len(report["perplexity"]) == 2
    world = json.loads((out / "world.json").read_text())
    assert world["world_size"] == 2 and {r["host"] for r in world["ranks"]} == {slurm1.hostnames[0]}
    expected = [(s, i) for s in (0, 1) for i in range(4)]
    for rank in (0, 1):  # no step trained twice or skipped, on either rank
        assert steps_trained(out, rank) == expected


def test_multi_node_job_spans_both_nodes(slurm2, tmp_path):
    out = tmp_path / "out"
    cfg = write_tiny_run(tmp_path, train={"max_steps_per_stage": 2, "micro_batch_size": 1})
    job = submit(slurm2, "slurm_multi.sbatch", job_env(out, cfg), out, "--nodes=2")
    finished(slurm2, job)
    assert len(json.loads((out / "forgetting.json").read_text())["perplexity"]) == 2
    world = json.loads((out / "world.json").read_text())
    # Node ranks follow the allocation's order: ranks 0-1 on the first node, 2-3 on the second.
    placed = sorted((r["rank"], r["local_rank"], r["host"]) for r in world["ranks"])
    n0, n1 = slurm2.hostnames
    assert placed == [(0, 0, n0), (1, 1, n0), (2, 0, n1), (3, 1, n1)]
