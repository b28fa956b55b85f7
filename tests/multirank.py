"""Run a script on real local ranks through the ``deepspeed`` launcher (CPU, gloo), for tests.

Each call takes its own free port: back-to-back launches on one port fail with EADDRINUSE.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from cltk.distributed import free_port


def remove_shm_buffers(port: str | int) -> list[str]:
    """Remove DeepSpeed CPU all-reduce buffers a launch on ``port`` left in /dev/shm, and return their
    names. cltk unlinks them itself once every rank has mapped them; a rank killed before that cannot,
    and a long test session must not fill the machine's memory with them."""
    left = sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    for f in left:
        f.unlink(missing_ok=True)
    return [f.name for f in left]


def deepspeed_bin() -> str:
    return str(Path(sys.executable).parent / "deepspeed")


def run_ranks(
    args: list[str],
    world_size: int = 2,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    module: bool = False,
    check: bool = True,
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus N [--module] args...``; returns the finished process (text output).

    ``args[0]`` is the script path (or the module name with ``module=True``). On timeout the whole
    process group is killed and ``subprocess.TimeoutExpired`` is raised. With ``check`` a non-zero
    exit raises ``AssertionError`` carrying the tail of the output.
    """
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    for attempt in range(3):
        # a free port can be taken by another process between the check and the bind: try another
        cmd = [deepspeed_bin(), "--num_gpus", str(world_size), "--master_port", str(free_port())]
        cmd += (["--module"] if module else []) + [str(a) for a in args]
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        finally:
            remove_shm_buffers(cmd[4])
        if proc.returncode == 0 or "EADDRINUSE" not in out or attempt == 2:
            break
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, "")
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-6000:]}")
    return result


def train_ranks(
    cfg: str | os.PathLike, *args: str, env: dict[str, str] | None = None, check: bool = True,
    timeout: float = 900,
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus 2 --module cltk train --config CFG [args]`` (see :func:`run_ranks`)."""
    return run_ranks(["cltk", "train", "--config", str(cfg), *args], module=True, env=env,
                     check=check, timeout=timeout)


def train_killed(cfg: str | os.PathLike, at: str) -> tuple[subprocess.CompletedProcess, str]:
    """:func:`train_ranks` SIGKILLed at ``at`` (``CLTK_KILL_AT``: ``STAGE:STEP[:RANK]``), the ranks'
    collectives timing out after 2 s; asserts the launch failed, and returns it with the name of the
    latest checkpoint the run had written."""
    killed = train_ranks(cfg, env={"CLTK_KILL_AT": at, "DEEPSPEED_TIMEOUT": "2"}, check=False)
    assert killed.returncode != 0, f"the run was not killed at {at}"
    latest = Path(cfg).parent / "out" / "checkpoints" / "latest"
    return killed, latest.read_text().strip()


def run_one(
    cfg: str | os.PathLike, *args: str, env: dict[str, str] | None = None, timeout: float = 900
) -> subprocess.CompletedProcess:
    """``python -m cltk train --config CFG [args]`` as one process (a process group of one)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "cltk", "train", "--config", str(cfg), *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
