"""Continual-learning methods, each one file on the :class:`~cltk.methods.base.Method` interface."""

from __future__ import annotations

from cltk.config import RunConfig
from cltk.methods.base import Method, StageContext

__all__ = ["Method", "StageContext", "build_methods"]


def build_methods(cfg: RunConfig) -> list[Method]:
    """The methods a run config asks for, in hook order (each takes the whole config)."""
    methods: list[Method] = []
    if cfg.lora is not None:
        from cltk.adapters import LoraMethod

        methods.append(LoraMethod(cfg))
    if cfg.blocks is not None and cfg.blocks.k > 1:
        from cltk.methods.soft_targets import SoftTargetMethod

        methods.append(SoftTargetMethod(cfg))
    if cfg.distill is not None:
        from cltk.methods.soft_targets import DistillMethod

        methods.append(DistillMethod(cfg))
    if cfg.das is not None:
        from cltk.methods.das import DasMethod

        methods.append(DasMethod(cfg))
    return methods
