"""cltk.distributed in one process, and the JIT build-lock check (no ranks launched here)."""

from __future__ import annotations

import ast
import os
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cltk import distributed as dist
from cltk.errors import UserError
from cltk.extensions import StaleBuildLockError, check_build_locks, holders, stale_locks

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = {
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "all_to_all",
    "all_to_all_single",
    "gather",
    "scatter",
}


def test_every_collective_goes_through_cltk_distributed():
    """Tensor collectives called on torch.distributed anywhere else would skip the device placement
    NCCL needs (a CPU tensor there breaks every multi-GPU run, and gloo on CPU cannot show it)."""
    offenders = []
    for path in [*ROOT.glob("cltk/**/*.py"), *ROOT.glob("benchmarks/*.py")]:
        if path.name == "distributed.py" and path.parent.name == "cltk":
            continue
        tree = ast.parse(path.read_text())
        aliases = {"torch.distributed"}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {
                    a.asname for a in node.names if a.name == "torch.distributed" and a.asname
                }
            if (
                isinstance(node, ast.ImportFrom)
                and node.module == "torch"
                and any(a.name == "distributed" for a in node.names)
            ):
                aliases |= {
                    a.asname or "distributed" for a in node.names if a.name == "distributed"
                }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = ast.unparse(node.func.value)
                if node.func.attr in COLLECTIVES and owner in aliases:
                    offenders.append(
                        f"{path.relative_to(ROOT)}:{node.lineno} {owner}.{node.func.attr}"
                    )
    assert not offenders, offenders


def test_comm_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "gloo")
    assert dist.comm_device() == torch.device("cpu")
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert dist.comm_device() == torch.device("cuda", 3)


def test_collectives_run_in_a_group_of_one_and_come_back_on_the_callers_device(monkeypatch):
    """In a process group of one the collective still runs (so one GPU exercises NCCL's device check)
    and the result lands in the caller's tensor."""
    calls = []
    real = torch.distributed.all_reduce

    def spy(t, *a, **k):
        calls.append(t.device)
        return real(t, *a, **k)

    if not torch.distributed.is_initialized():
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(dist.free_port()))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        monkeypatch.setattr(torch.distributed, "all_reduce", spy)
        t = torch.tensor([1.0, 2.0])
        assert dist.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
        assert calls == [torch.device("cpu")]
        assert dist.all_gather_cat(torch.ones(2, 3)).shape == (2, 3)
        assert dist.broadcast_object({"a": 1}) == {"a": 1}
    finally:
        torch.distributed.destroy_process_group()


def _lock(root: Path, name: str, age: float) -> Path:
    (root / name).mkdir(parents=True)
    lock = root / name / "lock"
    lock.touch()
    past = time.time() - age
    os.utime(lock, (past, past))
    return lock


def test_a_lock_left_by_a_killed_build_fails_at_once_naming_the_file(tmp_path):
    lock = _lock(tmp_path, "shm_comm", age=3600)
    _lock(tmp_path, "cpu_adam", age=5)  # a build that started seconds ago: wait for it
    assert stale_locks(tmp_path, stale_after=300) == [lock]
    with pytest.raises(StaleBuildLockError, match=str(lock)) as e:
        check_build_locks(tmp_path, stale_after=300)
    assert isinstance(e.value, UserError) and f"rm {lock}" in str(e.value)


def test_a_lock_held_open_by_a_live_builder_is_not_stale(tmp_path):
    lock = _lock(tmp_path, "shm_comm", age=3600)
    # a builder keeps the lock file open for the whole build (torch's FileBaton)
    proc = subprocess.Popen(["sleep", "30"], stdin=open(lock))
    try:
        deadline = time.time() + 5
        while proc.pid not in holders(lock) and time.time() < deadline:
            time.sleep(0.05)
        assert proc.pid in holders(lock)
        assert stale_locks(tmp_path, stale_after=300) == []
    finally:
        proc.kill()
        proc.wait()
    assert stale_locks(tmp_path, stale_after=300) == [lock]
