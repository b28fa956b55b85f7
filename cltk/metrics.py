"""The forgetting report: perplexity after each stage on every domain, and what it says.

``perplexity[i][j]`` is the perplexity on domain ``j`` measured after stage ``i``. A stage trains
one domain (or one block of it: several consecutive or scattered stages may train the same
domain); domains that no stage trains are evaluation-only. From the matrix:

- ``final``: the last row; ``average_final_perplexity``: its mean over the trained domains.
- ``plasticity[d]``: perplexity on ``d`` just after the last stage that trained ``d`` (how well it
  was learnt), and its mean.
- ``forgetting[d]``: ``final[d] - plasticity[d]`` for domains trained before the last stage (how
  much was lost since), its mean, and the relative form ``final / plasticity - 1``.

With the starting model's row (``start``, "row 0": the model before the first stage, on the same
held-out sequences) three more figures can be read:

- ``forgetting[d]`` of an evaluation-only domain: ``final[d] - start[d]`` (relative
  ``final / start - 1``): what the starting model knew and lost; ``mean_start_forgetting`` is their
  mean (``mean_forgetting`` stays the mean over the trained domains).
- ``gain[d]`` of a trained domain: ``start[d] - plasticity[d]`` (relative ``1 - plasticity / start``):
  how much the stages learnt it.
- ``forward_transfer[d]``: ``start[d] - before[d]``, ``before`` being the row just before the first
  stage that trains ``d`` (relative ``1 - before / start``): what earlier stages did for ``d`` before it
  was trained. Positive is good; domains trained by the first stage have none.

Lower perplexity is better, so positive forgetting is bad. A run stopped mid-way gives fewer rows
than stages: the report then speaks about the stages completed (``completed_stages``), and "the
last stage" above means the last completed one.

Downstream tasks (lm-eval's accuracy and the like, higher is better) ride along as ``tasks``, a
:class:`cltk.task_report.TaskReport` with figures of their own sign. Pure Python. Saving, loading and
drawing a report: :mod:`cltk.metrics_files`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from cltk.task_report import TaskReport, format_tasks, task_headline

__all__ = ["ForgettingReport", "forgetting_report", "format_table", "compare_reports", "stage_label"]


@dataclass(frozen=True)
class ForgettingReport:
    """Perplexity matrix of a continual run and the figures derived from it.

    Build it with :func:`forgetting_report`, which validates the inputs and fills every field.
    Per-domain figures are dicts keyed by domain name, in ``domain_names`` order, holding only the
    domains the figure applies to. Means are ``None`` when no domain qualifies (for example
    ``mean_forgetting`` after a single stage).
    """

    perplexity: list[list[float]]  # [completed stages][domains]
    stage_names: list[str]  # every planned stage, completed or not
    domain_names: list[str]
    stage_domains: list[str | list[str]]  # the domain each planned stage trains (joint: all)
    final: dict[str, float]  # every domain, evaluation-only ones included
    average_final_perplexity: float | None  # mean of ``final`` over the trained domains
    plasticity: dict[str, float]
    mean_plasticity: float | None
    forgetting: dict[str, float]
    mean_forgetting: float | None
    relative_forgetting: dict[str, float]
    mean_relative_forgetting: float | None
    eval_only_domains: list[str] = field(default_factory=list)
    start: list[float] | None = None  # row 0: the starting model, before the first stage
    mean_start_forgetting: float | None = None  # over evaluation-only domains, final - start
    mean_relative_start_forgetting: float | None = None
    gain: dict[str, float] = field(default_factory=dict)  # trained domains, start - plasticity
    relative_gain: dict[str, float] = field(default_factory=dict)
    mean_gain: float | None = None
    mean_relative_gain: float | None = None
    forward_transfer: dict[str, float] = field(default_factory=dict)
    relative_forward_transfer: dict[str, float] = field(default_factory=dict)
    mean_forward_transfer: float | None = None
    tasks: TaskReport | None = None  # downstream tasks (lm-eval), when eval.tasks names any

    @property
    def completed_stages(self) -> int:
        """Rows of the matrix: stages finished and evaluated."""
        return len(self.perplexity)

    @property
    def is_partial(self) -> bool:
        """True when the run stopped before its last planned stage."""
        return self.completed_stages < len(self.stage_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: the inputs, the derived figures and the stage count."""
        return {
            "perplexity": [list(row) for row in self.perplexity],
            "stage_names": list(self.stage_names),
            "domain_names": list(self.domain_names),
            "stage_domains": list(self.stage_domains),
            "completed_stages": self.completed_stages,
            "eval_only_domains": list(self.eval_only_domains),
            "final": dict(self.final),
            "average_final_perplexity": self.average_final_perplexity,
            "plasticity": dict(self.plasticity),
            "mean_plasticity": self.mean_plasticity,
            "forgetting": dict(self.forgetting),
            "mean_forgetting": self.mean_forgetting,
            "relative_forgetting": dict(self.relative_forgetting),
            "mean_relative_forgetting": self.mean_relative_forgetting,
            "start": list(self.start) if self.start is not None else None,
            "mean_start_forgetting": self.mean_start_forgetting,
            "mean_relative_start_forgetting": self.mean_relative_start_forgetting,
            "gain": dict(self.gain),
            "relative_gain": dict(self.relative_gain),
            "mean_gain": self.mean_gain,
            "mean_relative_gain": self.mean_relative_gain,
            "forward_transfer": dict(self.forward_transfer),
            "relative_forward_transfer": dict(self.relative_forward_transfer),
            "mean_forward_transfer": self.mean_forward_transfer,
            "tasks": self.tasks.to_dict() if self.tasks is not None else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ForgettingReport":
        """Rebuild from :meth:`to_dict` output; the figures are recomputed from the matrix."""
        missing = [k for k in ("perplexity", "stage_names", "domain_names", "stage_domains")
                   if k not in data]
        if missing:
            raise ValueError(f"forgetting report dict lacks {', '.join(missing)}")
        return forgetting_report(
            data["perplexity"], data["stage_names"], data["domain_names"], data["stage_domains"],
            start=data.get("start"),
            tasks=TaskReport.from_dict(data["tasks"]) if data.get("tasks") else None,
        )


def trained_by(entry: str | Sequence[str]) -> tuple[str, ...]:
    """The domains one ``stage_domains`` entry names: one, or several for a joint stage."""
    return (entry,) if isinstance(entry, str) else tuple(entry)


def stage_label(entry: str | Sequence[str]) -> str:
    """A ``stage_domains`` entry as text: ``code``, or ``a+b`` for a joint stage."""
    return "+".join(trained_by(entry))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _validate(
    perplexity: Sequence[Sequence[float]],
    stage_names: Sequence[str],
    domain_names: Sequence[str],
    stage_domains: Sequence[str | Sequence[str]],
) -> list[list[float]]:
    if not stage_names:
        raise ValueError("stage_names is empty: a run has at least one stage")
    if len(set(stage_names)) != len(stage_names):
        raise ValueError(f"stage_names must be unique, got {list(stage_names)}")
    if not domain_names:
        raise ValueError("domain_names is empty")
    if len(set(domain_names)) != len(domain_names):
        raise ValueError(f"domain_names must be unique, got {list(domain_names)}")
    if len(stage_domains) != len(stage_names):
        raise ValueError(
            f"stage_domains has {len(stage_domains)} entries for {len(stage_names)} stages"
        )
    unknown = sorted({d for e in stage_domains for d in trained_by(e) if d not in domain_names})
    if unknown:
        raise ValueError(f"stage_domains names domains not in domain_names: {unknown}")
    if not perplexity:
        raise ValueError("perplexity has no rows: no stage was evaluated")
    if len(perplexity) > len(stage_names):
        raise ValueError(
            f"perplexity has {len(perplexity)} rows but only {len(stage_names)} stages"
        )
    return [_check_row(row, f"perplexity row {i}", f"perplexity[{i}]",
                       f"after stage {stage_names[i]!r}", domain_names)
            for i, row in enumerate(perplexity)]


def _check_row(
    row: Sequence[float], label: str, index: str, what: str, domain_names: Sequence[str]
) -> list[float]:
    if len(row) != len(domain_names):
        raise ValueError(
            f"{label} ({what}) has {len(row)} values for {len(domain_names)} domains"
        )
    values = [float(v) for v in row]
    for j, v in enumerate(values):
        # inf is allowed (a diverged stage); NaN or <= 0 means the evaluation itself broke
        if math.isnan(v) or v <= 0:
            raise ValueError(
                f"{index}[{j}] ({what}, domain {domain_names[j]!r}) is {v}: perplexities are > 0"
            )
    return values


def forgetting_report(
    perplexity: Sequence[Sequence[float]],
    stage_names: Sequence[str],
    domain_names: Sequence[str],
    stage_domains: Sequence[str | Sequence[str]],
    start: Sequence[float] | None = None,
    tasks: TaskReport | None = None,
) -> ForgettingReport:
    """Compute the forgetting report from a (possibly partial) perplexity matrix.

    Args:
        perplexity: ``[completed stages][domains]``; row ``i`` is measured after stage ``i``. Fewer
            rows than stages means the run stopped early; the report covers the completed stages.
        stage_names: the name of every planned stage, unique.
        domain_names: the name of every evaluated domain (matrix columns), unique.
        stage_domains: ``stage_domains[i]`` is the domain stage ``i`` trains (an entry of
            ``domain_names``), or a list of them for a joint stage. Domains named by no stage are
            evaluation-only.
        start: row 0, the starting model's perplexity on every domain (None: not measured). It
            gives the forgetting of evaluation-only domains, each domain's gain and forward transfer.
        tasks: the downstream-task matrix (:func:`cltk.task_report.task_report`), carried as is.

    Returns:
        A :class:`ForgettingReport`.

    Raises:
        ValueError: on mismatched lengths, unknown or duplicate names, or a NaN / non-positive
            perplexity.
    """
    rows = _validate(perplexity, stage_names, domain_names, stage_domains)
    row0 = None if start is None else _check_row(
        start, "start row", "start", "the starting model", domain_names)
    done = len(rows)
    last_row = rows[-1]
    final = {d: last_row[j] for j, d in enumerate(domain_names)}
    planned = {d for e in stage_domains for d in trained_by(e)}
    trained = [d for d in domain_names if d in planned]
    eval_only = [d for d in domain_names if d not in planned]

    # last completed stage that trained each domain
    last_stage: dict[str, int] = {}
    for i in range(done):
        last_stage.update({d: i for d in trained_by(stage_domains[i])})

    plasticity: dict[str, float] = {}
    forgetting: dict[str, float] = {}
    relative: dict[str, float] = {}
    for j, d in enumerate(domain_names):
        if d not in last_stage:
            continue  # evaluation-only, or not reached yet by a partial run
        just_after = rows[last_stage[d]][j]
        plasticity[d] = just_after
        if last_stage[d] < done - 1:  # domains of the last stage have had no time to forget
            forgetting[d] = final[d] - just_after
            relative[d] = final[d] / just_after - 1.0

    from_start = _start_figures(rows, row0, domain_names, stage_domains, eval_only, plasticity)
    # evaluation-only domains join the per-domain forgetting; the means stay over trained domains
    mean_forgetting = _mean(list(forgetting.values()))
    mean_relative = _mean(list(relative.values()))
    forgetting.update(from_start.pop("start_forgetting"))
    relative.update(from_start.pop("relative_start_forgetting"))
    return ForgettingReport(
        perplexity=rows,
        stage_names=list(stage_names),
        domain_names=list(domain_names),
        stage_domains=list(stage_domains),
        final=final,
        average_final_perplexity=_mean([final[d] for d in trained]),
        plasticity=plasticity,
        mean_plasticity=_mean(list(plasticity.values())),
        forgetting={d: forgetting[d] for d in domain_names if d in forgetting},
        mean_forgetting=mean_forgetting,
        relative_forgetting={d: relative[d] for d in domain_names if d in relative},
        mean_relative_forgetting=mean_relative,
        eval_only_domains=eval_only,
        start=row0,
        tasks=tasks,
        **from_start,
    )


def _start_figures(
    rows: list[list[float]],
    start: list[float] | None,
    domain_names: Sequence[str],
    stage_domains: Sequence[str | Sequence[str]],
    eval_only: list[str],
    plasticity: dict[str, float],
) -> dict[str, Any]:
    """The figures read against row 0 (see the module docstring); empty without it."""
    out: dict[str, Any] = {k: {} for k in (
        "start_forgetting", "relative_start_forgetting", "gain", "relative_gain",
        "forward_transfer", "relative_forward_transfer")}
    if start is None:
        return {**out, "mean_start_forgetting": None, "mean_relative_start_forgetting": None,
                "mean_gain": None, "mean_relative_gain": None, "mean_forward_transfer": None}
    s0 = dict(zip(domain_names, start))
    final = dict(zip(domain_names, rows[-1]))
    for d in eval_only:
        out["start_forgetting"][d] = final[d] - s0[d]
        out["relative_start_forgetting"][d] = final[d] / s0[d] - 1.0
    for d, p in plasticity.items():
        out["gain"][d] = s0[d] - p
        out["relative_gain"][d] = 1.0 - p / s0[d]
    for d in plasticity:  # domains trained so far
        first = next(i for i, e in enumerate(stage_domains) if d in trained_by(e))
        if first > 0:  # the first stage's domain has nothing before it but the start
            before = rows[first - 1][domain_names.index(d)]
            out["forward_transfer"][d] = s0[d] - before
            out["relative_forward_transfer"][d] = 1.0 - before / s0[d]
    return {
        **out,
        "mean_start_forgetting": _mean(list(out["start_forgetting"].values())),
        "mean_relative_start_forgetting": _mean(list(out["relative_start_forgetting"].values())),
        "mean_gain": _mean(list(out["gain"].values())),
        "mean_relative_gain": _mean(list(out["relative_gain"].values())),
        "mean_forward_transfer": _mean(list(out["forward_transfer"].values())),
    }


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------


def _fmt(value: float | None, signed: bool = False, percent: bool = False) -> str:
    if value is None:
        return "n/a"
    if percent:
        return f"{100.0 * value:+.1f}%"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _start_headline(report: ForgettingReport, advice: bool = True) -> list[str]:
    """The two numbers a user continuing a pretrained model reads first (needs row 0); ``advice``
    adds what to change when a figure is n/a (the printed text has it, a picture does not)."""
    if report.start is None:
        return []
    learned = "n/a" if report.mean_relative_gain is None else (
        f"perplexity {_fmt(-report.mean_relative_gain, percent=True)}, mean gain "
        f"{_fmt(report.mean_gain, signed=True)}")
    if report.eval_only_domains:
        lost = (f"perplexity {_fmt(report.mean_relative_start_forgetting, percent=True)}, mean "
                f"forgetting {_fmt(report.mean_start_forgetting, signed=True)}")
    elif advice:
        lost = ("n/a (no evaluation-only domain: add the domains the starting model should keep "
                "with eval_only: true)")
    else:
        lost = "n/a (no evaluation-only domain)"
    return [
        f"learned (trained domains, start -> after own stage): {learned}",
        f"lost (evaluation-only domains, start -> final): {lost}",
    ]


def headline(report: ForgettingReport, advice: bool = True) -> list[str]:
    """The summary lines under the table; with ``advice=False`` the heatmap's title, which carries
    the figures only (advice on what to change belongs in the printed text)."""
    return _start_headline(report, advice) + task_headline(report.tasks) + _stage_headline(report)


def _stage_headline(report: ForgettingReport) -> list[str]:
    return [
        f"average final perplexity: {_fmt(report.average_final_perplexity)}",
        f"mean forgetting{' (trained domains, since own stage)' if report.start else ''}: "
        f"{_fmt(report.mean_forgetting, signed=True)} "
        f"({_fmt(report.mean_relative_forgetting, percent=True)})",
        f"mean plasticity: {_fmt(report.mean_plasticity)}",
    ]


def format_table(report: ForgettingReport) -> str:
    """A fixed-width text table: the matrix, the per-domain figures, then the headline figures."""
    stage_w = max(len("after stage"), *(len(s) for s in report.stage_names))
    train_w = max(len("trains") if report.start is None else len("(before)"),
                  *(len(stage_label(d)) for d in report.stage_domains))
    col_w = max(9, *(len(d) for d in report.domain_names))
    header = f"{'after stage':<{stage_w}}  {'trains':<{train_w}} |" + "".join(
        f" {d:>{col_w}}" for d in report.domain_names
    )
    lines = [header, "-" * len(header)]
    if report.start is not None:
        lines.append(f"{'start':<{stage_w}}  {'(before)':<{train_w}} |"
                     + "".join(f" {v:>{col_w}.2f}" for v in report.start))
    for i, row in enumerate(report.perplexity):
        lines.append(
            f"{report.stage_names[i]:<{stage_w}}  {stage_label(report.stage_domains[i]):<{train_w}} |"
            + "".join(f" {v:>{col_w}.2f}" for v in row)
        )
    lines.append("-" * len(header))
    label_w = stage_w + train_w + 2
    for label, values, kw in (
        ("plasticity", report.plasticity, {}),
        ("forgetting", report.forgetting, {"signed": True}),
        ("relative forgetting", report.relative_forgetting, {"percent": True}),
        *((("gain over start", report.gain, {"signed": True}),
           ("forward transfer", report.forward_transfer, {"signed": True}))
          if report.start is not None else ()),
    ):
        cells = "".join(f" {_fmt(values.get(d), **kw):>{col_w}}" for d in report.domain_names)
        lines.append(f"{label:<{label_w}} |{cells}")
    if report.tasks is not None:
        lines.extend(format_tasks(report.tasks, report.stage_names,
                                  [stage_label(d) for d in report.stage_domains]))
    lines.append("")
    lines.extend(_start_headline(report))  # the two numbers read first, when row 0 was measured
    lines.extend(task_headline(report.tasks))
    if report.is_partial:
        lines.append(
            f"partial run: {report.completed_stages} of {len(report.stage_names)} stages completed"
        )
    if report.eval_only_domains:
        lines.append(f"evaluation-only domains: {', '.join(report.eval_only_domains)}")
    lines.extend(_stage_headline(report))
    return "\n".join(lines)


def compare_reports(named: Mapping[str, ForgettingReport]) -> str:
    """A markdown table comparing runs (one row per method), for docs and benchmarks.

    Args:
        named: method name -> its report, in the order to list them.

    Returns:
        Markdown: method, average final perplexity, mean forgetting (absolute and relative), mean
        plasticity. Lower is better in every column.
    """
    if not named:
        raise ValueError("compare_reports needs at least one report")
    lines = [
        "| method | avg final ppl | forgetting | forgetting (rel.) | plasticity |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in named.items():
        partial = f" (partial: {r.completed_stages}/{len(r.stage_names)} stages)" \
            if r.is_partial else ""
        lines.append(
            f"| {name}{partial} | {_fmt(r.average_final_perplexity)} | "
            f"{_fmt(r.mean_forgetting, signed=True)} | "
            f"{_fmt(r.mean_relative_forgetting, percent=True)} | {_fmt(r.mean_plasticity)} |"
        )
    return "\n".join(lines)
