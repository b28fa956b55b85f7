"""The continual-learning methods cltk ships, one package each; importing this registers them all
(:mod:`cltk.registry`). A method's package holds its config section, its checks, its hooks and its
helpers; see docs/writing-a-method.md.
"""

from __future__ import annotations

from cltk.methods import agem, das, distill, ema, ewc, lora, merge, replay, soft_targets, spg

__all__ = ["agem", "das", "distill", "ema", "ewc", "lora", "merge", "replay", "soft_targets", "spg"]
