"""Replay (``replay:``): shares of every step drawn from earlier stages and from general data.

Two mixes, each its own share of every global batch (see docs/replay.md):

- **earlier stages** (``share``, or ``shares`` per stage): earlier domains' training data, or, with
  ``memory: N``, a fixed-size reservoir of earlier stages' sequences kept in ``OUT/replay/``;
- **general data** (``general_share``, or ``general_shares`` per stage): sources that are never a
  stage (``general:``), e.g. a sample like the model's pre-training data, prepared like domains.

Here: the config section and its checks; the hooks are in :mod:`.method`, the reservoir in
:mod:`.reservoir`.
"""

from __future__ import annotations

from cltk.methods.replay.config import OUTPUT, ReplayConfig, active, check, extra_sources
from cltk.registry import MethodSpec, register

__all__ = ["OUTPUT", "ReplayConfig", "SPEC"]



SPEC = register(MethodSpec("replay", ReplayConfig, "cltk.methods.replay.method:ReplayMethod",
                           "replay of earlier stages and of general data", check, active=active,
                           order=5, extra_sources=extra_sources, run_files=(OUTPUT,)))
