"""A forgetting report on disk: ``forgetting.json`` (the report), ``forgetting.csv`` (the matrix) and
``forgetting.png`` (the heatmap), and reading it back. The figures themselves: :mod:`cltk.metrics`."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Callable

from cltk.metrics import ForgettingReport, headline, stage_label

JSON_NAME = "forgetting.json"
CSV_NAME = "forgetting.csv"
PNG_NAME = "forgetting.png"


def heatmap_title(report: ForgettingReport) -> str:
    """The heatmap's title: the summary's figures, without the printed text's advice."""
    return "\n".join(headline(report, advice=False))


def save_report(report: ForgettingReport, out_dir: str | Path, heatmap: bool = True) -> dict[str, Path]:
    """Write ``forgetting.json``, ``forgetting.csv`` and ``forgetting.png`` into ``out_dir``.

    The CSV holds the matrix: a header row ``stage, trains, <domain>...``, the row ``start`` (the
    starting model, empty ``trains``) when measured, then one row per completed stage; downstream tasks
    add ``<task> (<metric>)`` and ``<task> (<metric>_stderr)`` columns. Returns the paths by kind
    (``"json"``, ``"csv"``, and ``"png"`` unless ``heatmap`` is false (``eval.heatmap: false``): then
    no picture is drawn, and one an earlier attempt drew is removed).
    """
    t = report.tasks
    task_cols = [] if t is None else [
        h for k, m in zip(t.tasks, t.metrics) for h in (f"{k} ({m})", f"{k} ({m}_stderr)")]

    def task_cells(values, errs) -> list[str]:
        if t is None:
            return []
        if values is None:
            return [""] * len(task_cols)
        errs = errs or [None] * len(values)
        return [c for v, e in zip(values, errs) for c in (repr(v), "" if e is None else repr(e))]

    rows = [["start", "", *(repr(v) for v in report.start),
             *task_cells(t.start if t else None, t.start_stderr if t else None)]] \
        if report.start is not None else []
    rows += [[report.stage_names[i], stage_label(report.stage_domains[i]), *(repr(v) for v in row),
              *(task_cells(t.scores[i], t.stderr[i]) if t else [])]
             for i, row in enumerate(report.perplexity)]
    return write_matrix(out_dir, (JSON_NAME, CSV_NAME, PNG_NAME), report.to_dict(),
                        ["stage", "trains", *report.domain_names, *task_cols], rows,
                        (lambda path: _save_heatmap(report, path)) if heatmap else None)


def write_matrix(
    out_dir: str | Path,
    names: tuple[str, str, str],
    record: dict[str, Any],
    header: list[str],
    rows: list[list[Any]],
    draw: Callable[[Path], None] | None,
) -> dict[str, Path]:
    """A matrix report on disk, for every mode (the forgetting matrix, NER's F1 matrix): ``record``
    as JSON, ``header`` and ``rows`` as CSV, the figure ``draw(path)`` writes; the three file
    ``names`` in that order (``draw`` None: no figure, an old one removed). Returns the paths by kind
    (``"json"``, ``"csv"``, ``"png"``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in zip(("json", "csv", "png"), names)}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    if draw is None:  # no figure asked for: a stale one would contradict the matrix
        paths.pop("png").unlink(missing_ok=True)
        return paths
    draw(paths["png"])
    return paths


def load_report(path: str | Path) -> ForgettingReport:
    """Read a report saved by :func:`save_report`: the JSON file, or the directory holding it."""
    p = Path(path)
    if p.is_dir():
        p = p / JSON_NAME
    if not p.is_file():
        raise ValueError(f"no forgetting report at {p}")
    return ForgettingReport.from_dict(json.loads(p.read_text()))


def _save_heatmap(report: ForgettingReport, path: Path) -> None:
    # Figure + Agg canvas directly: no pyplot, so the process-wide backend is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, NullFormatter

    matrix = ([report.start] if report.start is not None else []) + report.perplexity
    labels = (["start (before training)"] if report.start is not None else []) + [
        f"{report.stage_names[i]} ({stage_label(report.stage_domains[i])})"
        for i in range(report.completed_stages)]
    rows, cols = len(matrix), len(report.domain_names)
    n_tasks = len(report.tasks.tasks) if report.tasks is not None else 0
    fig = Figure(figsize=(max(6.5, 3.2 + 1.1 * cols + (2.2 + 1.1 * n_tasks if n_tasks else 0)),
                          2.2 + 0.55 * rows))
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(1, 2, width_ratios=[cols + 1, n_tasks + 1]) if n_tasks else None
    ax = fig.add_subplot(grid[0, 0] if grid is not None else 111)
    finite = [v for row in matrix for v in row if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (1.0, 10.0)
    hi = max(hi, lo * 1.0001)  # LogNorm needs vmin < vmax
    capped = [[min(v, hi) for v in row] for row in matrix]
    # log colour scale: perplexities of different domains differ by multiples, not offsets
    image = ax.imshow(capped, cmap="viridis_r", norm=LogNorm(vmin=lo, vmax=hi), aspect="auto")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            shade = image.norm(min(v, hi))
            ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                    color="white" if shade > 0.5 else "black")
    ax.set_xticks(range(cols), report.domain_names, rotation=30, ha="right")
    ax.set_yticks(range(rows), labels)
    if report.start is not None:  # row 0 is the starting model, not a stage
        ax.axhline(0.5, color="white", linewidth=3)
    ax.set_xlabel("evaluated domain")
    ax.set_ylabel("after stage (trains)")
    bar = fig.colorbar(image, ax=ax, label="perplexity (log scale)")
    bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))  # 40, not 4 x 10^1
    bar.ax.yaxis.set_minor_formatter(NullFormatter())  # minor labels of a log axis overlap
    if grid is not None:
        _task_panel(fig.add_subplot(grid[0, 1]), report, rows)
    (fig.suptitle if grid is not None else ax.set_title)(heatmap_title(report), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")


def _task_panel(ax, report: ForgettingReport, rows: int) -> None:
    """The downstream tasks beside the perplexity matrix, on their own linear colour scale."""
    t = report.tasks
    assert t is not None
    matrix = ([t.start] if report.start is not None and t.start is not None else
              [[math.nan] * len(t.tasks)] if report.start is not None else []) + t.scores
    finite = [v for row in matrix for v in row if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    image = ax.imshow(matrix, cmap="viridis", vmin=lo, vmax=max(hi, lo + 0.01), aspect="auto")
    for i, row in enumerate(matrix):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.3f}" if math.isfinite(v) else "n/a", ha="center", va="center",
                    fontsize=8, color="black" if image.norm(v) > 0.5 else "white")
    ax.set_xticks(range(len(t.tasks)), [f"{k} ({m})" for k, m in zip(t.tasks, t.metrics)],
                  rotation=30, ha="right")
    ax.set_yticks(range(rows), [""] * rows)
    if report.start is not None:
        ax.axhline(0.5, color="white", linewidth=3)
    ax.set_xlabel("downstream task (lm-eval)")
    direction = "higher is better" if all(t.higher_is_better) else "see each task's direction"
    ax.figure.colorbar(image, ax=ax, label=f"task score ({direction})")
