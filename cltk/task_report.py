"""The task matrix of the forgetting report: each downstream task's main metric after every stage.

``scores[i][k]`` is task ``k``'s main metric (lm-eval's first metric of the task, e.g. ``acc``) after
stage ``i``; ``start`` is the starting model's row. Tasks belong to no stage, so every figure is read
against the best point or the start, and every figure is signed so that it reads the same whatever the
metric's direction (``sign`` is +1 when higher is better, as for accuracy, and -1 for a lower-is-better
metric such as lambada's perplexity):

- ``forgetting[k]``: ``sign * (best - final)``, ``best`` being the best value before the last stage
  (row 0 included): the drop from the best point (Chaudhry et al. 2018's forgetting measure). Positive
  is bad, as for perplexity's forgetting; for accuracy it is ``-BWT`` measured from the best point.
- ``lost[k]``: ``sign * (start - final)``: what the starting model could do and lost (needs row 0).
  Positive is bad.
- ``gain[k]``: ``sign * (best stage - start)``: the most any stage raised the task above the start
  (needs row 0). Positive is good.

Pure Python; :mod:`cltk.metrics` carries a :class:`TaskReport` in its report.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

Scores = Mapping[str, Mapping[str, Any]]  # task -> {metric, value, stderr, higher_is_better, ...}


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if math.isfinite(v)]
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class TaskReport:
    tasks: list[str]
    metrics: list[str]  # the main metric of each task
    higher_is_better: list[bool]
    scores: list[list[float]]  # [completed stages][tasks]; NaN where a stage has no score
    stderr: list[list[float | None]]
    start: list[float] | None = None
    start_stderr: list[float | None] | None = None
    final: dict[str, float] = field(default_factory=dict)
    forgetting: dict[str, float] = field(default_factory=dict)
    mean_forgetting: float | None = None
    lost: dict[str, float] = field(default_factory=dict)
    mean_lost: float | None = None
    gain: dict[str, float] = field(default_factory=dict)
    mean_gain: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": list(self.tasks), "metrics": list(self.metrics),
            "higher_is_better": list(self.higher_is_better),
            "scores": [list(r) for r in self.scores], "stderr": [list(r) for r in self.stderr],
            "start": self.start, "start_stderr": self.start_stderr, "final": dict(self.final),
            "forgetting": dict(self.forgetting), "mean_forgetting": self.mean_forgetting,
            "lost": dict(self.lost), "mean_lost": self.mean_lost,
            "gain": dict(self.gain), "mean_gain": self.mean_gain,
        }

    def rows_as_scores(self) -> tuple[list[dict[str, dict]], dict[str, dict] | None]:
        """The inputs of :func:`task_report` again (for rebuilding a report read from JSON)."""
        def one(values, errs) -> dict[str, dict]:
            return {t: {"metric": m, "value": v, "stderr": e, "higher_is_better": h}
                    for t, m, h, v, e in zip(self.tasks, self.metrics, self.higher_is_better,
                                             values, errs)}
        start = one(self.start, self.start_stderr or [None] * len(self.tasks)) \
            if self.start is not None else None
        return [one(r, e) for r, e in zip(self.scores, self.stderr)], start

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskReport:
        base = cls(data["tasks"], data["metrics"], data["higher_is_better"], data["scores"],
                   data["stderr"], data.get("start"), data.get("start_stderr"))
        rows, start = base.rows_as_scores()
        report = task_report(rows, start)
        assert report is not None
        return report


def task_report(rows: Sequence[Scores], start: Scores | None = None) -> TaskReport | None:
    """The task matrix and its figures from per-stage scores (:func:`cltk.tasks.evaluate_tasks`).

    Columns are the tasks of the last row (then any other row's), in their order; a row without a
    task's score holds NaN there, and the figures skip it. None when no row has a task.
    """
    tasks: list[str] = []
    for r in [*reversed(rows), *([start] if start else [])]:
        tasks += [t for t in r if t not in tasks]
    if not tasks or not rows:
        return None
    meta = {t: next(r[t] for r in [*reversed(rows), *([start] if start else [])] if t in r)
            for t in tasks}

    def values(r: Scores) -> tuple[list[float], list[float | None]]:
        return ([float(r[t]["value"]) if t in r else math.nan for t in tasks],
                [r[t].get("stderr") if t in r else None for t in tasks])

    matrix = [values(r) for r in rows]
    s0 = values(start) if start else None
    sign = {t: 1.0 if meta[t].get("higher_is_better", True) else -1.0 for t in tasks}
    final, forgetting, lost, gain = {}, {}, {}, {}
    for k, t in enumerate(tasks):
        col = [m[0][k] for m in matrix]
        final[t] = col[-1]
        earlier = [v for v in ([s0[0][k]] if s0 else []) + col[:-1] if math.isfinite(v)]
        if earlier and math.isfinite(col[-1]):
            best = max(earlier, key=lambda v: sign[t] * v)
            forgetting[t] = sign[t] * (best - col[-1])
        if s0 and math.isfinite(s0[0][k]):
            if math.isfinite(col[-1]):
                lost[t] = sign[t] * (s0[0][k] - col[-1])
            seen = [v for v in col if math.isfinite(v)]
            if seen:
                gain[t] = sign[t] * (max(seen, key=lambda v: sign[t] * v) - s0[0][k])
    return TaskReport(
        tasks=tasks, metrics=[meta[t]["metric"] for t in tasks],
        higher_is_better=[sign[t] > 0 for t in tasks],
        scores=[m[0] for m in matrix], stderr=[m[1] for m in matrix],
        start=s0[0] if s0 else None, start_stderr=s0[1] if s0 else None,
        final=final, forgetting=forgetting, mean_forgetting=_mean(list(forgetting.values())),
        lost=lost, mean_lost=_mean(list(lost.values())),
        gain=gain, mean_gain=_mean(list(gain.values())),
    )


# ----- text ------------------------------------------------------------------------------------------


def _cell(v: float | None, e: float | None = None, signed: bool = False) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    text = f"{v:+.3f}" if signed else f"{v:.3f}"
    return text + (f"±{e:.3f}" if e else "")


def format_tasks(r: TaskReport, stage_names: Sequence[str], stage_labels: Sequence[str]) -> list[str]:
    """The task matrix as fixed-width lines (under the perplexity table)."""
    stage_w = max(len("after stage"), *(len(s) for s in stage_names))
    train_w = max(len("(before)"), *(len(s) for s in stage_labels))
    heads = [f"{t} ({m})" for t, m in zip(r.tasks, r.metrics)]
    col_w = max(13, *(len(h) for h in heads))
    header = f"{'after stage':<{stage_w}}  {'trains':<{train_w}} |" + "".join(
        f" {h:>{col_w}}" for h in heads)
    lines = ["", "downstream tasks (lm-eval; " + ", ".join(
        f"{t}: {'higher' if h else 'lower'} is better" for t, h in zip(r.tasks, r.higher_is_better))
        + ")", header, "-" * len(header)]
    if r.start is not None:
        errs = r.start_stderr or [None] * len(r.tasks)
        lines.append(f"{'start':<{stage_w}}  {'(before)':<{train_w}} |"
                     + "".join(f" {_cell(v, e):>{col_w}}" for v, e in zip(r.start, errs)))
    for i, (row, errs) in enumerate(zip(r.scores, r.stderr)):
        lines.append(f"{stage_names[i]:<{stage_w}}  {stage_labels[i]:<{train_w}} |"
                     + "".join(f" {_cell(v, e):>{col_w}}" for v, e in zip(row, errs)))
    lines.append("-" * len(header))
    label_w = stage_w + train_w + 2
    for label, figures in (("forgetting (best -> final)", r.forgetting),
                           *((("lost (start -> final)", r.lost), ("gain over start", r.gain))
                             if r.start is not None else ())):
        label = label if len(label) <= label_w else label.split(" (")[0]
        lines.append(f"{label:<{label_w}} |" + "".join(
            f" {_cell(figures.get(t), signed=True):>{col_w}}" for t in r.tasks))
    return lines


def task_headline(r: TaskReport | None) -> list[str]:
    """One summary line: the tasks' mean figures (signed: forgetting and lost > 0 are bad)."""
    if r is None:
        return []
    parts = [f"forgetting {_cell(r.mean_forgetting, signed=True)}"]
    if r.start is not None:
        parts = [f"lost from start {_cell(r.mean_lost, signed=True)}",
                 f"gain {_cell(r.mean_gain, signed=True)}", *parts]
    return [f"downstream tasks (mean over {len(r.tasks)}): " + ", ".join(parts)]
