"""Continual-learning methods, each one file on the :class:`~cltk.methods.base.Method` interface."""

from __future__ import annotations

from cltk.config import RunConfig
from cltk.methods.base import Method, StageContext

__all__ = ["Method", "StageContext", "build_methods"]


def build_methods(cfg: RunConfig) -> list[Method]:
    """The methods a run config asks for, in hook order."""
    methods: list[Method] = []
    return methods
