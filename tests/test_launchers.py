"""The launch scripts and ZeRO configs: syntax, local and hostfile (--no_ssh) launches of the probe.

The launches run the real deepspeed launcher on CPU ranks (gloo); SLURM is in test_slurm.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.multirank import free_port

ROOT = Path(__file__).resolve().parents[1]
PROBE = "tests/scripts/dist_probe.py"
SCRIPTS = ["local.sh", "multinode.sh", "slurm_single.sbatch", "slurm_multi.sbatch"]
CONFIGS = {"zero1.json": 1, "zero2.json": 2, "zero3.json": 3, "zero3_offload.json": 3}


def launch_env(**extra: str) -> dict[str, str]:
    # The venv's bin first: the scripts call `deepspeed` by name, as users do with it activated.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("OMP_NUM_THREADS", None)  # the scripts' own default is under test
    return env


def records(out: Path) -> list[dict]:
    lines = [line for f in sorted(out.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_parses_and_is_executable(name):
    path = ROOT / "launch" / name
    if name.endswith(".sh"):  # run by path; sbatch reads its scripts itself
        assert os.access(path, os.X_OK), f"{path} is not executable"
    res = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "# Use" in path.read_text(), f"{name} has no usage header"


@pytest.mark.parametrize("name,stage", CONFIGS.items())
def test_zero_config_holds_only_zero_and_precision(name, stage):
    cfg = json.loads((ROOT / "ds_configs" / name).read_text())
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["bf16"] == {"enabled": "auto"}
    # cltk owns these; a value here would fight the run config.
    owned = {
        "optimizer",
        "scheduler",
        "train_batch_size",
        "train_micro_batch_size_per_gpu",
        "gradient_accumulation_steps",
        "gradient_clipping",
        "fp16",
    }
    assert not owned & cfg.keys()
    offload = "offload" in name
    for part in ("offload_optimizer", "offload_param"):
        assert (cfg["zero_optimization"].get(part, {}).get("device") == "cpu") == offload


@pytest.mark.multirank
def test_local_sh_runs_two_ranks_and_every_zero_config_trains(tmp_path):
    out = tmp_path / "out"
    configs = [f"ds_configs/{n}" for n in CONFIGS]
    res = subprocess.run(
        ["launch/local.sh", "2", "--out", str(out), "--ds-configs", *configs],
        cwd=ROOT,
        env=launch_env(CLTK_CMD=PROBE, MASTER_PORT=str(free_port())),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    recs = records(out)
    assert sorted(r["rank"] for r in recs) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in recs)
    cores = os.cpu_count() or 1
    assert all(r["omp_threads"] == str(max(1, cores // 2)) for r in recs)
    for r in recs:
        for path, stage in zip(configs, CONFIGS.values()):
            got = r["ds"][path]
            assert got["stage"] == stage, path
            assert got["losses"][-1] < got["losses"][0], f"{path}: no update applied: {got}"


@pytest.mark.multirank
def test_multinode_sh_no_ssh_joins_two_launchers(tmp_path):
    # Two "nodes" of one rank each on this machine: each launcher starts only its node's slot.
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nnode-a slots=1\nnode-b slots=1\n")
    out = tmp_path / "out"
    common = dict(CLTK_CMD=PROBE, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [
        subprocess.Popen(
            ["launch/multinode.sh", str(hostfile), "--out", str(out)],
            cwd=ROOT,
            env=launch_env(NODE_RANK=str(i), **common),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (0, 1)
    ]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    recs = records(out)
    assert sorted((r["rank"], r["local_rank"]) for r in recs) == [(0, 0), (1, 0)]
    assert all(r["world"] == 2 and r["sum"] == 3.0 for r in recs)
