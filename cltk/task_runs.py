"""Downstream tasks in a run: scored after each stage, for row 0, and for finished stages that lack them.

A score is kept beside perplexity in the stage's record (``stage.json``: ``tasks``, ``task_settings``) and
row 0's (``start.json``), and lm-eval's results JSON beside it (``stages/<i>-<name>/lm_eval.json``,
``start/lm_eval.json``). A record scored with other task settings (the task list, ``limit``,
``num_fewshot``) is scored again; one scored with the same is read, never re-scored (a resume).

The model scored is the one in memory: the stage's DeepSpeed engine right after its export (ZeRO 3 stays
partitioned, see :mod:`cltk.tasks`), or for row 0 the engine that measures its perplexity. A finished
stage scored anew (tasks added on ``--resume``) is loaded from its export as row 0 is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cltk import checkpoint
from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.start import evaluate_frozen
from cltk.tasks import TaskScorer
from cltk.tracking import log


def complete_tasks(cfg: RunConfig, tokenizer: Any, stage_dir: Path, record: dict[str, Any],
                   record_file: str) -> dict[str, dict[str, Any]]:
    """A finished stage's task scores: read from its record, or scored on its export when the record
    lacks them (tasks added on a resume), and the record rewritten (collective)."""
    scorer = TaskScorer(cfg, tokenizer, record, out_dir=stage_dir, label=f"stage {stage_dir.name}")
    if scorer.settings is None:
        return {}
    if scorer.missing:
        from cltk.models import build_model

        log(f"stage {stage_dir.name}: scoring its export on tasks {', '.join(scorer.missing)}")
        evaluate_frozen(cfg, build_model(cfg, tokenizer, init_dir=stage_dir), [], after=scorer)
        if dist.is_main():
            checkpoint.write_atomic(stage_dir / record_file, json.dumps(record, indent=1))
        dist.barrier()
    return record.get("tasks") or {}
