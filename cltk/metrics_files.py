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


def save_report(report: ForgettingReport, out_dir: str | Path) -> dict[str, Path]:
    """Write ``forgetting.json``, ``forgetting.csv`` and ``forgetting.png`` into ``out_dir``.

    The CSV holds the matrix: a header row ``stage, trains, <domain>...``, the row ``start`` (the
    starting model, empty ``trains``) when measured, then one row per completed stage. Returns the three paths by kind (``"json"``, ``"csv"``, ``"png"``).
    """
    rows = [["start", "", *(repr(v) for v in report.start)]] if report.start is not None else []
    rows += [[report.stage_names[i], stage_label(report.stage_domains[i]), *(repr(v) for v in row)]
             for i, row in enumerate(report.perplexity)]
    return write_matrix(out_dir, (JSON_NAME, CSV_NAME, PNG_NAME), report.to_dict(),
                        ["stage", "trains", *report.domain_names], rows,
                        lambda path: _save_heatmap(report, path))


def write_matrix(
    out_dir: str | Path,
    names: tuple[str, str, str],
    record: dict[str, Any],
    header: list[str],
    rows: list[list[Any]],
    draw: Callable[[Path], None],
) -> dict[str, Path]:
    """A matrix report on disk, for every mode (the forgetting matrix, NER's F1 matrix): ``record``
    as JSON, ``header`` and ``rows`` as CSV, the figure ``draw(path)`` writes; the three file
    ``names`` in that order. Returns the paths by kind (``"json"``, ``"csv"``, ``"png"``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {kind: out / name for kind, name in zip(("json", "csv", "png"), names)}
    paths["json"].write_text(json.dumps(record, indent=2) + "\n")
    with paths["csv"].open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
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
    fig = Figure(figsize=(max(6.5, 3.2 + 1.1 * cols), 2.2 + 0.55 * rows))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
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
    ax.set_title("\n".join(headline(report)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
