"""One run at a time in an output directory: ``OUT/.cltk.lock``, one line naming the holder.

``cltk train`` takes the lock (rank 0, before anything in the directory changes) and holds it until the
run ends. A second run into the same directory, or a requeued job that starts while the first still runs,
is refused with one line naming the holder (``host pid``). The lock is an ``fcntl.flock`` on the file, so
the kernel (or the NFS/Lustre lock manager) drops it when the holder dies, even by ``kill -9``: a lock
file left by a dead process never blocks ``--resume``. The file is removed when the run ends.

Where the file system refuses ``flock`` (some NFS mounts without a lock manager), the line in the file
decides instead: a live process on this host holding it refuses the run; a dead one's line is replaced; a
line from another host refuses the run and says to remove the file if that job is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
from pathlib import Path

from cltk.errors import UserError

LOCK_FILE = ".cltk.lock"
_held: dict[str, int] = {}  # resolved lock path -> the fd this process holds it with


class RunLockedError(UserError):
    """Another live process runs in this output directory."""


def _holder(path: Path) -> str:
    with contextlib.suppress(OSError):
        line = path.read_text(errors="replace").strip().splitlines()
        if line:
            return line[0]
    return "an unknown process"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _refuse(path: Path, holder: str, extra: str = "") -> RunLockedError:
    host, _, pid = holder.partition(" ")
    return RunLockedError(
        f"{path.parent} is in use by another cltk run (host {host}, pid {pid or '?'}, lock "
        f"{path}){extra}; wait for it to end, or choose another output_dir. Nothing was changed"
    )


def _no_flock_check(path: Path) -> None:
    """The holder line decides where ``flock`` is not supported."""
    holder = _holder(path) if path.is_file() else ""
    if not holder or holder == "an unknown process":
        return
    host, _, pid = holder.partition(" ")
    me = socket.gethostname()
    if host == me and pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
        return  # our own, or a dead process's on this host: take it over
    extra = "" if host == me else "; this file system has no locks, so if that job is gone remove the file"
    raise _refuse(path, holder, extra)


def acquire(out: Path) -> Path:
    """Take the lock of output directory ``out`` for this process (again: a no-op); returns its path.

    Raises:
        RunLockedError: another live process holds it (the message names its host and pid).
    """
    path = Path(out) / LOCK_FILE
    key = str(path.resolve())
    if key in _held:
        return path
    line = f"{socket.gethostname()} {os.getpid()}\n".encode()
    for _ in range(20):  # retry when the holder removed the file between our open and our lock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _refuse(path, _holder(path)) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            _no_flock_check(path)  # raises when a live process holds it
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # we locked a file the last holder had already removed
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.pwrite(fd, line, 0)
        os.fsync(fd)
        _held[key] = fd
        return path
    raise RunLockedError(f"cannot take the lock {path}: it keeps being replaced; is another run starting?")


def release(out: Path) -> None:
    """Drop this process's lock of ``out`` (nothing if it holds none): the file is removed, then unlocked."""
    path = Path(out) / LOCK_FILE
    key = str(path.resolve())
    fd = _held.pop(key, None)
    if fd is None:
        return
    with contextlib.suppress(OSError):
        if os.fstat(fd).st_ino == os.stat(path).st_ino:
            path.unlink()
    os.close(fd)  # closing the last descriptor releases the flock
