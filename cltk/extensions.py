"""DeepSpeed's JIT-compiled ops (CPU shm all-reduce, CPU Adam): a stale build lock fails at once.

torch builds each op under ``$TORCH_EXTENSIONS_DIR/<op>/`` (default
``~/.cache/torch_extensions/py<ver>_<accelerator>/<op>/``) while holding ``<op>/lock``: the builder
creates the file and keeps it open until the build ends, and every other process waits for the file to
disappear. A build killed mid-way (Ctrl-C, a job's time limit, an OOM kill) leaves the file behind, and
every later launch then waits on it forever, silently.

:func:`check_build_locks` runs before DeepSpeed's first build or load: a lock that no process on this
node holds open and that is older than ``CLTK_JIT_LOCK_STALE_SECONDS`` (default 300) is stale, and the
run stops with a message naming the file and the fix. It does not delete the file itself: on a shared
filesystem another node may be building into the same directory (a lock held there is invisible here);
the message says how to tell.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from cltk.errors import UserError

STALE_ENV = "CLTK_JIT_LOCK_STALE_SECONDS"


class StaleBuildLockError(UserError):
    """A JIT build lock left by a killed build: every launch would wait on it forever."""


def extensions_root() -> Path:
    """Where torch puts JIT-built ops (``TORCH_EXTENSIONS_DIR`` or torch's default for this build)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    import torch
    from torch.utils.cpp_extension import get_default_build_root

    accel = (
        f"rocm{torch.version.hip.replace('.', '')}"
        if torch.version.hip
        else f"cu{torch.version.cuda.replace('.', '')}"
        if torch.version.cuda
        else "cpu"
    )
    py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{py}_{accel}"


def holders(path: Path) -> list[int]:
    """PIDs of the processes on this node that have ``path`` open (read from /proc; [] elsewhere)."""
    target = str(path.resolve())
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                pids.append(int(fd_dir.parent.name))
        except OSError:  # the process ended, or its fds are not ours to read
            continue
    return pids


def stale_locks(root: Path | None = None, stale_after: float | None = None) -> list[Path]:
    """Build locks under ``root`` that nobody on this node holds and that are older than ``stale_after``
    seconds (default ``$CLTK_JIT_LOCK_STALE_SECONDS`` or 300)."""
    root = extensions_root() if root is None else root
    if stale_after is None:
        stale_after = float(os.environ.get(STALE_ENV, "300"))
    now, out = time.time(), []
    for lock in sorted(root.glob("*/lock")):
        try:
            age = now - lock.stat().st_mtime
        except FileNotFoundError:  # the build just finished
            continue
        if age > stale_after and not holders(lock):
            out.append(lock)
    return out


def check_build_locks(root: Path | None = None, stale_after: float | None = None) -> None:
    """Raise :class:`StaleBuildLockError` naming every stale lock (see the module doc)."""
    locks = stale_locks(root, stale_after)
    if not locks:
        return
    names = ", ".join(str(lk) for lk in locks)
    raise StaleBuildLockError(
        f"stale DeepSpeed JIT build lock {names}: a build of that op was killed and left it, and every "
        f"launch would wait on it forever. No process on this node holds it. Remove it (rm {names}) and "
        "launch again; the op is rebuilt once (~1 min). If TORCH_EXTENSIONS_DIR is on a filesystem that "
        "other nodes share and a job there may be building right now, wait for that job instead, or "
        "give each node its own TORCH_EXTENSIONS_DIR. (CLTK_JIT_LOCK_STALE_SECONDS sets how old a lock "
        "must be to count as stale.)"
    )
