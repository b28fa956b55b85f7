"""The SLURM job scripts on a real local SLURM cluster (tests/slurm_cluster.py): one node (and a
requeue that resumes from the checkpoint), and two nodes in network namespaces.

The jobs launch the probe (tests/scripts/dist_probe.py) through ``CLTK_CMD``; ``job_env`` is the one
place to change to launch a real cltk run instead (CLTK_CONFIG + CLTK_OUT, no CLTK_CMD).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.slurm_cluster import SlurmCluster, cluster_fixture

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[1]
slurm1 = cluster_fixture(nodes=1)
slurm2 = cluster_fixture(nodes=2)


def job_env(out: Path) -> dict[str, str]:
    """What the job scripts launch, and where the run's output goes."""
    return {
        "CLTK_CMD": f"{ROOT}/tests/scripts/dist_probe.py --out {out}",
        "CLTK_OUT": str(out),
        "NPROC_PER_NODE": "2",
        # sbatch hands the submitter's environment to the job: the venv must be on PATH there.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def submit(cluster: SlurmCluster, script: str, out: Path, *opts: str) -> str:
    # No GPUs here: override the scripts' --gpus-per-node, as on any CPU cluster.
    args = ["--gpus-per-node=0", f"--output={out.parent}/slurm-%j.out", *opts, f"launch/{script}"]
    return cluster.sbatch(args, env=job_env(out), cwd=str(ROOT))


def finished(cluster: SlurmCluster, job: str, restarts: int = 0) -> dict[str, str]:
    info = cluster.wait(job, timeout=240, restarts=restarts)
    log = Path(info["StdOut"])
    text = log.read_text() if log.exists() else "(no job log)"
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (
        f"job {job}: {info['JobState']} {info['ExitCode']}\n{text[-4000:]}\n{cluster.logs()}"
    )
    return {**info, "log": text}


def records(out: Path) -> list[dict]:
    lines = [line for f in sorted(out.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
    return [json.loads(line) for line in lines]


def test_single_node_job_runs_two_ranks_and_resumes_when_requeued(slurm1, tmp_path):
    out = tmp_path / "out"
    job = submit(slurm1, "slurm_single.sbatch", out)
    finished(slurm1, job)
    recs = records(out)
    assert sorted(r["rank"] for r in recs) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in recs)
    assert {r["host"] for r in recs} == {slurm1.hostnames[0]}
    assert all(r["job"] == job and not r["resume"] for r in recs)

    # The probe left out/checkpoints/latest, as a cltk run does: the rerun must pass --resume.
    # A requeued job waits out its old credential (cred_expire: 10 s here, 120 s by default).
    slurm1.run(["scontrol", "requeue", job])
    info = finished(slurm1, job, restarts=1)
    runs = [json.loads(line) for line in (out / "rank0.jsonl").read_text().splitlines()]
    assert [(r["resume"], r["restart"]) for r in runs] == [(False, None), (True, "1")]
    assert "resuming" in info["log"]  # --open-mode=append: both attempts in one log


def test_multi_node_job_spans_both_nodes(slurm2, tmp_path):
    out = tmp_path / "out"
    job = submit(slurm2, "slurm_multi.sbatch", out, "--nodes=2")
    finished(slurm2, job)
    recs = records(out)
    assert all(r["world"] == 4 and r["sum"] == 10.0 for r in recs)
    # Node ranks follow the allocation's order: ranks 0-1 on the first node, 2-3 on the second.
    placed = sorted((r["rank"], r["local_rank"], r["host"]) for r in recs)
    n0, n1 = slurm2.hostnames
    assert placed == [(0, 0, n0), (1, 1, n0), (2, 0, n1), (3, 1, n1)]
