"""The one base class of errors caused by what the user gave cltk (config, data, model, files, run state).

``cltk`` prints a :class:`UserError` as one line, ``cltk: <message>``, once (rank 0) and exits 2; any other
exception is a bug in cltk and keeps its traceback (a bug report should carry it). Raise a subclass of
``UserError`` for every mistake a user can fix, with a message that names the cause and the fix.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input a user can fix; the message names the cause (key, file and line) and the fix."""


class ConfigError(UserError):
    """A run config that cannot run; the message names the key and the fix."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"{key}: {message}" if key else message)
