"""Downstream tasks through EleutherAI's lm-evaluation-harness (``eval.tasks``; the ``[eval]`` extra).

cltk does not score tasks itself: it hands the model it already holds in memory to lm-eval
(``HFLM(pretrained=<model object>, tokenizer=...)``) and ``lm_eval.simple_evaluate`` does the rest, with
lm-eval's task names, YAML format (``eval.include_path``), ``limit``, ``num_fewshot`` and batch size.
Of each task cltk keeps the main metric (the task's first metric, e.g. ``acc``, and its stderr) for the
forgetting report (:mod:`cltk.task_report`); lm-eval's own results JSON is kept per stage.

Ranks: lm-eval's data-parallel evaluation splits each task's documents over ranks (document ``i`` on rank
``i % world_size``) and gathers the per-document metrics on rank 0, so no request is scored twice. HFLM
assumes one process when handed a model object; :func:`_ranked_lm` gives it cltk's rank, world size and
collectives. Under ZeRO 3 every forward gathers each layer's parameters from all ranks, so every rank
run its forwards in step with the others: a flag exchanged before each forward says whether any rank
still has work, and a rank out of requests runs one-token forwards until none has
(:meth:`_RankedLM._lockstep`). No rank ever holds the whole model.
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cltk import distributed as dist
from cltk.errors import ConfigError, UserError
from cltk.tracking import log

if TYPE_CHECKING:
    from cltk.config import RunConfig

RESULTS_NAME = "lm_eval.json"
INSTALL = "pip install -e '.[eval]' (or pip install lm-eval)"


class TaskError(UserError):
    """A task that cannot run: lm-eval missing, an unknown task, a bad task YAML."""


@dataclass(frozen=True)
class TaskSettings:
    """What lm-eval is asked: task names, include directories, and its evaluation options."""

    tasks: tuple[str, ...]
    include_path: tuple[str, ...] = ()
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 8

    @classmethod
    def from_config(cls, cfg: RunConfig) -> TaskSettings | None:
        """The run's task settings, or None when ``eval.tasks`` is empty."""
        e = cfg.eval
        if not e.tasks:
            return None
        return cls(tuple(e.tasks), tuple(str(cfg.resolve(p).resolve()) for p in e.include_path),
                   e.limit, e.num_fewshot, e.task_batch_size)

    def record(self) -> dict[str, Any]:
        """What a stored score was measured with (a changed setting is measured anew)."""
        return {"limit": self.limit, "num_fewshot": self.num_fewshot}


# ----- checks (before any work) --------------------------------------------------------------------


def require_lm_eval(key: str = "eval.tasks") -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        raise TaskError(f"{key}: lm-evaluation-harness is not installed ({e}); {INSTALL}") from e


def check_include_path(dirs: list[Path], key: str = "eval.include_path") -> None:
    """Every directory exists and each ``*.yaml`` under it is a task lm-eval can index.

    lm-eval skips a YAML it cannot read without a word (its index logs it at debug level); the user would
    then read "unknown task" for a task whose file is broken, so cltk reads each file with lm-eval's own
    loader first and names the file and the error.
    """
    from lm_eval.tasks._index import TaskIndex
    from lm_eval.tasks._yaml_loader import load_yaml

    for i, d in enumerate(dirs):
        if not d.is_dir():
            raise TaskError(f"{key}[{i}]: {d} is not a directory; give directories of lm-eval task "
                            "YAML files (e.g. tasks/ of this repository)")
        for path in TaskIndex._iter_yaml_files(d):
            try:
                TaskIndex.process_cfg(load_yaml(path, resolve_func=False, recursive=True), path, {})
            except Exception as e:  # yaml.YAMLError, ValueError of an unknown shape, a missing include
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise TaskError(f"{key}: {path} is not a valid lm-eval task YAML ({first}); fix or "
                                "remove it (format: lm-eval's docs/task_guide.md)") from e


@functools.lru_cache(maxsize=4)
def _manager(include_path: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_path) or None, include_defaults=defaults)


def task_manager(include_path: tuple[str, ...], tasks: tuple[str, ...]):
    """An lm-eval ``TaskManager`` that knows ``tasks``; the user's directories alone when they hold
    them all (indexing lm-eval's ~15k builtin YAMLs takes ~25 s on 2 cores), else the builtins too."""
    if include_path:
        own = _manager(include_path, False)
        if all(t in own.all_tasks for t in tasks):
            return own
    return _manager(include_path, True)


def check_tasks(cfg: RunConfig, world_size: int = 1) -> None:
    """Check ``eval.tasks`` and its options (called by :func:`cltk.validate.validate`)."""
    e = cfg.eval
    if e.include_path and not e.tasks:
        raise ConfigError("eval.include_path", "is set but eval.tasks is empty: name the tasks to run")
    if not e.tasks:
        return
    if e.limit is not None and e.limit <= 0:
        raise ConfigError("eval.limit", f"must be > 0 (a count, or a share below 1), got {e.limit}")
    if e.limit is not None and e.limit >= 1 and e.limit < world_size:
        raise ConfigError("eval.limit", f"{e.limit} documents cannot be split over {world_size} "
                          f"ranks; give at least {world_size}")
    if e.num_fewshot is not None and e.num_fewshot < 0:
        raise ConfigError("eval.num_fewshot", f"must be >= 0, got {e.num_fewshot}")
    if e.task_batch_size <= 0:
        raise ConfigError("eval.task_batch_size", f"must be > 0, got {e.task_batch_size}")
    if len(set(e.tasks)) != len(e.tasks):
        raise ConfigError("eval.tasks", f"names a task twice: {list(e.tasks)}")
    require_lm_eval()
    s = TaskSettings.from_config(cfg)
    assert s is not None
    check_include_path([Path(p) for p in s.include_path])
    known = task_manager(s.include_path, s.tasks).all_tasks
    for t in s.tasks:
        if t not in known:
            close = difflib.get_close_matches(t, known, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else "see `lm_eval ls tasks`"
            raise TaskError(f"eval.tasks: unknown lm-eval task {t!r}; {hint} (your own task YAMLs go "
                            "in eval.include_path)")


# ----- evaluation ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _ranked_lm() -> type:
    """HFLM on cltk's ranks (a class made on first use: lm-eval is an optional extra)."""
    from lm_eval.models.huggingface import HFLM

    class _RankedLM(HFLM):
        def __init__(self, model, tokenizer, batch_size: int, lockstep: bool):
            super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                             max_batch_size=batch_size)
            self._rank, self._world_size = dist.rank(), dist.world_size()
            self._device = dist.device()
            self.lockstep = lockstep and self._world_size > 1
            self.forwards, self.padding = 0, False
            self.requests: list[tuple[str, int, int]] = []  # (task, doc, choice) scored on this rank
            # first among the top module's hooks: the flag is exchanged before ZeRO 3 gathers anything
            self.hook = model.register_forward_pre_hook(self._count, prepend=True)

        def _count(self, *_: Any) -> None:
            self.forwards += 1
            if self.lockstep and not self.padding:
                self._anyone(busy=True)  # every forward meets one flag exchange on every rank

        def _anyone(self, busy: bool) -> bool:
            """Whether any rank is still running real forwards (collective, as a forward is)."""
            flag = dist.all_reduce_sum(torch.tensor([int(busy)], device=self._device))
            return bool(flag.item() > 0)

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if self._world_size <= 1:
                return tensor
            return dist.all_gather_cat(tensor.reshape(1) if tensor.ndim == 0 else tensor)

        def barrier(self) -> None:
            dist.barrier()

        def _lockstep(self) -> None:
            """ZeRO 3: a rank out of requests runs one-token forwards while any other still works.

            Each real forward is preceded by a flag exchange (``busy``), each padding forward by one
            (``idle``), so the ranks' collectives pair one to one: flag, then the forward's gathers.
            A count exchanged at the end would meet another rank's gathers mid-forward and hang.
            """
            if not self.lockstep:
                return
            one = torch.zeros((1, 1), dtype=torch.long, device=self._device)
            self.padding = True
            try:
                with torch.no_grad():
                    while self._anyone(busy=False):
                        self.model(one)
            finally:
                self.padding = False

        def _seen(self, requests) -> None:
            self.requests.extend((r.task_name, r.doc_id, r.idx) for r in requests)

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._seen(requests)
            out = super().loglikelihood(requests, disable_tqdm=True)
            self._lockstep()
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            self._seen(requests)
            out = super().loglikelihood_rolling(requests, disable_tqdm=True)
            self._lockstep()
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            self._seen(requests)
            out = super().generate_until(requests, disable_tqdm=True)
            self._lockstep()
            return out

    return _RankedLM


def make_lm(model: torch.nn.Module, tokenizer: Any, settings: TaskSettings, zero3: bool = False):
    """lm-eval's HFLM around a model in memory, on every rank (collective use)."""
    require_lm_eval()
    return _ranked_lm()(model, tokenizer, settings.batch_size, lockstep=zero3)


def main_metrics(results: dict[str, Any], requested: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Each requested task's (or group's) main metric from lm-eval's results: its first metric.

    A tag (a name that is neither task nor group) stands for its tasks, each a column of its own.
    """
    res, configs = results["results"], results.get("configs", {})
    subtasks = results.get("group_subtasks", {})

    def under(group: str) -> set[str]:
        out = set(subtasks.get(group, []))
        for s in list(out):
            out |= under(s)
        return out

    covered = set().union(*(under(n) for n in requested if n in res)) if requested else set()
    names = [n for n in requested if n in res]
    names += [k for k in res if k not in names and k not in covered and k not in requested]
    out = {}
    for name in names:
        entry = res[name]
        keys = [k for k in entry if "," in k and "_stderr," not in k]
        if name in configs and configs[name].get("metric_list"):
            first = configs[name]["metric_list"][0]["metric"]
            keys = [k for k in keys if k.split(",")[0] == first] or keys
        keys = [k for k in keys if isinstance(entry[k], (int, float))]
        if not keys:
            continue
        metric, filt = keys[0].split(",", 1)
        stderr = entry.get(f"{metric}_stderr,{filt}")
        higher = results.get("higher_is_better", {}).get(name, {}).get(metric, True)
        out[name] = {
            "metric": metric, "filter": filt, "value": float(entry[keys[0]]),
            "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
            "higher_is_better": bool(higher),
            "samples": results.get("n-samples", {}).get(name, {}).get("effective"),
        }
    return out


def evaluate_tasks(
    model: torch.nn.Module, tokenizer: Any, settings: TaskSettings, out_dir: Path | None = None,
    zero3: bool = False,
) -> dict[str, dict[str, Any]]:
    """Score ``model`` on the settings' tasks with ``lm_eval.simple_evaluate`` (collective).

    Returns every task's main metric (see :func:`main_metrics`) on every rank; rank 0 writes lm-eval's
    results JSON to ``out_dir/lm_eval.json`` when given. The model is left as it was (eval mode during).
    """
    import lm_eval
    from lm_eval.utils import handle_non_serializable

    was_training = model.training
    quiet = logging.getLogger("lm_eval")
    level, _ = quiet.level, quiet.setLevel(logging.ERROR)  # per-request truncation notes, etc.
    lm = make_lm(model, tokenizer, settings, zero3=zero3)
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    rng = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:  # simple_evaluate seeds random, numpy and torch: the run's own streams are put back after
        results = lm_eval.simple_evaluate(
            model=lm, tasks=list(settings.tasks), num_fewshot=settings.num_fewshot,
            batch_size=settings.batch_size, limit=settings.limit, log_samples=False,
            task_manager=task_manager(settings.include_path, settings.tasks),
        )
    finally:
        lm.hook.remove()
        model.train(was_training)
        random.setstate(rng[0])
        np.random.set_state(rng[1])
        torch.set_rng_state(rng[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        quiet.setLevel(level)
    summary = None
    if dist.is_main():
        summary = main_metrics(results, settings.tasks)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
            (Path(out_dir) / RESULTS_NAME).write_text(text + "\n")
    return dist.broadcast_object(summary)


def scores_line(scores: dict[str, dict[str, Any]]) -> str:
    """``kjv_cloze acc 0.412 ± 0.025, ...`` for the log."""
    return ", ".join(
        f"{t} {s['metric']} {s['value']:.3f}" + (f" ± {s['stderr']:.3f}" if s["stderr"] else "")
        for t, s in scores.items())


class TaskScorer:
    """Scores ``record``'s tasks on an engine when they are missing or stale, into the record.

    Call it with the engine (it fits :func:`cltk.start.evaluate_frozen`'s ``after``); ``missing``
    names the tasks it will score (empty: nothing to do).
    """

    def __init__(self, cfg: RunConfig, tokenizer: Any, record: dict[str, Any],
                 out_dir: Path | None = None, label: str = "start"):
        self.settings = TaskSettings.from_config(cfg)
        self.tokenizer, self.record, self.out_dir, self.label = tokenizer, record, out_dir, label
        self.missing: list[str] = []
        if self.settings is not None and record.get("task_settings") != self.wanted():
            self.missing = list(self.settings.tasks)
        if self.out_dir is None and self.missing and label == "start":
            self.out_dir = cfg.out / "start"

    def wanted(self) -> dict[str, Any] | None:
        s = self.settings
        return None if s is None else {"tasks": list(s.tasks), **s.record()}

    def __call__(self, engine: Any) -> dict[str, dict[str, Any]]:
        if not self.missing:
            return self.record.get("tasks") or {}
        assert self.settings is not None
        t0 = time.perf_counter()
        scores = evaluate_tasks(engine.module, self.tokenizer, self.settings, self.out_dir,
                                zero3=engine.zero_optimization_stage() == 3)
        log(f"{self.label}: tasks {scores_line(scores)} ({time.perf_counter() - t0:.1f} s)")
        self.record["tasks"], self.record["task_settings"] = scores, self.wanted()
        self.missing = []
        return scores
