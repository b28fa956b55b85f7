"""A write that fails on a full disk becomes one clear error saying where and what is still intact."""

from __future__ import annotations

import contextlib
import errno
import shutil
from collections.abc import Iterator
from pathlib import Path

from cltk.errors import UserError

# Below this many free bytes a failed write is taken as a full disk (torch.save reports ENOSPC only as
# "unexpected pos ..."; the disk is then left with ~0 bytes free).
_FULL_BELOW_BYTES = 1 << 20


class DiskFullError(UserError):
    """The disk filled up while cltk wrote a checkpoint or an export."""


def no_space_error(exc: BaseException) -> BaseException | None:
    """The exception in ``exc``'s chain that says the disk is full (ENOSPC), or None."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e
        if "No space left on device" in str(e) or "os error 28" in str(e):
            return e
        e = e.__cause__ or e.__context__
    return None


def _is_disk_full(exc: BaseException, path: Path) -> bool:
    if no_space_error(exc) is not None:
        return True
    try:
        return shutil.disk_usage(path).free < _FULL_BELOW_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def disk_full_guard(path: Path, writing: str, intact: str) -> Iterator[None]:
    """Turn a write that failed on a full disk into a :class:`DiskFullError`; other errors pass.

    Args:
        path: where the write goes (named in the message, and whose free space is checked).
        writing: what was being written, e.g. "checkpoint s01-end".
        intact: what is still good and how to go on, e.g. "the last good checkpoint s00-end is intact".
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not _is_disk_full(e, Path(path)):
            raise
        raise DiskFullError(f"no space left on {path} while writing {writing}; {intact}") from e
