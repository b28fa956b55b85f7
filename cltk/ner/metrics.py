"""Entity-level precision / recall / F1 (seqeval's default conventions) and the F1 matrix report.

Entities (as seqeval's default, non-strict mode, IOB2): an entity starts at ``B-t``, or at ``I-t``
when the previous tag is not of type ``t``; it continues over ``I-t`` tags and ends at ``O``, at a
``B-``, or at a tag of another type. A prediction counts only when type, start and end all match.

The report: ``f1[i][j]`` is the F1 of type ``j`` after step ``i``. ``plasticity[t]`` is the F1 of
``t`` just after the step that introduced it; ``forgetting[t] = plasticity[t] - final[t]`` for types
introduced before the last step. Higher F1 is better, so positive forgetting is bad (the perplexity
report's sign convention: positive = lost).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from cltk.metrics_files import write_matrix

JSON_NAME, CSV_NAME, PNG_NAME = "ner_f1.json", "ner_f1.csv", "ner_f1.png"


def entities(tags: list[str]) -> set[tuple[str, int, int]]:
    """``(type, start, end)`` spans (end inclusive) of one BIO sequence."""
    out = set()
    cur: tuple[str, int] | None = None
    for i, tag in enumerate([*tags, "O"]):
        kind = None if tag == "O" else tag[2:]
        starts = tag.startswith("B-") or (kind is not None and (cur is None or cur[0] != kind))
        if cur is not None and (kind is None or starts):
            out.add((cur[0], cur[1], i - 1))
            cur = None
        if kind is not None and starts:
            cur = (kind, i)
    return out


def prf(gold: list[list[str]], pred: list[list[str]], types: list[str]) -> dict[str, dict]:
    """Per type (and ``micro``): precision, recall, F1 and support, over sentences.

    A type with no gold and no predicted entity scores 0 (as seqeval with zero_division=0).
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences, {len(pred)} predicted")
    counts = {t: [0, 0, 0] for t in types}  # true positives, predicted, gold
    for g, p in zip(gold, pred):
        if len(g) != len(p):
            raise ValueError(f"sentence lengths differ: {len(g)} gold tags, {len(p)} predicted")
        ge, pe = entities(g), entities(p)
        for e in ge | pe:
            if e[0] not in counts:
                continue
            c = counts[e[0]]
            c[0] += e in ge and e in pe
            c[1] += e in pe
            c[2] += e in ge
    counts["micro"] = [sum(c[k] for c in counts.values()) for k in range(3)]
    out = {}
    for t, (tp, npred, ngold) in counts.items():
        precision = tp / npred if npred else 0.0
        recall = tp / ngold if ngold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[t] = {"precision": precision, "recall": recall, "f1": f1, "support": ngold}
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


@dataclass
class F1Report:
    """The F1 matrix of a continual NER run and the figures derived from it."""

    f1: list[list[float]]  # [completed steps][types]
    step_names: list[str]
    types: list[str]
    type_steps: list[int]  # the step that introduces each type
    final: dict[str, float]
    plasticity: dict[str, float]
    forgetting: dict[str, float]
    mean_final_f1: float | None  # over the types introduced so far
    mean_plasticity: float | None
    mean_forgetting: float | None


def f1_report(f1: list[list[float]], step_names: list[str], steps_types: list[list[str]]) -> F1Report:
    """Build the report from the matrix (rows: after each completed step; columns: all types)."""
    types = [t for ts in steps_types for t in ts]
    type_steps = [i for i, ts in enumerate(steps_types) for _ in ts]
    if not f1 or any(len(r) != len(types) for r in f1) or len(f1) > len(step_names):
        raise ValueError(f"F1 matrix {len(f1)} rows must each have {len(types)} columns")
    done = len(f1)
    final = dict(zip(types, f1[-1]))
    seen = [t for t, s in zip(types, type_steps) if s < done]
    plasticity = {t: f1[s][j] for j, (t, s) in enumerate(zip(types, type_steps)) if s < done}
    forgetting = {t: plasticity[t] - final[t] for t, s in zip(types, type_steps) if s < done - 1}
    return F1Report(
        f1=[list(map(float, r)) for r in f1], step_names=list(step_names), types=types,
        type_steps=type_steps, final=final, plasticity=plasticity, forgetting=forgetting,
        mean_final_f1=_mean([final[t] for t in seen]),
        mean_plasticity=_mean(list(plasticity.values())),
        mean_forgetting=_mean(list(forgetting.values())),
    )


def _f(v: float | None, signed: bool = False) -> str:
    return "n/a" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def headline(r: F1Report) -> list[str]:
    return [f"mean final F1: {_f(r.mean_final_f1)}", f"mean forgetting: "
            f"{_f(r.mean_forgetting, True)}", f"mean plasticity: {_f(r.mean_plasticity)}"]


def format_table(r: F1Report) -> str:
    w = max(10, *(len(s) for s in r.step_names))
    lines = [f"{'after step':<{w}} |" + "".join(f" {t:>9}" for t in r.types)]
    for name, row in zip(r.step_names, r.f1):
        lines.append(f"{name:<{w}} |" + "".join(f" {v:>9.3f}" for v in row))
    for label, vals, signed in (("plasticity", r.plasticity, False),
                                ("forgetting", r.forgetting, True)):
        lines.append(f"{label:<{w}} |" + "".join(
            f" {_f(vals.get(t), signed):>9}" for t in r.types))
    return "\n".join(lines + headline(r))


def save_report(r: F1Report, out_dir: Path, details: list[dict] | None = None) -> dict[str, Path]:
    """Write ``ner_f1.json`` (with per-step precision/recall in ``details``), ``.csv``, ``.png``."""
    rows = [[name, *(repr(v) for v in row)] for name, row in zip(r.step_names, r.f1)]
    return write_matrix(out_dir, (JSON_NAME, CSV_NAME, PNG_NAME),
                        {**asdict(r), "details": details or []}, ["step", *r.types], rows,
                        lambda path: _heatmap(r, path))


def _heatmap(r: F1Report, path: Path) -> None:
    # Figure + Agg canvas directly (no pyplot: the process-wide backend is left alone)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, cols = len(r.f1), len(r.types)
    fig = Figure(figsize=(max(5.0, 2.8 + 1.0 * cols), 2.2 + 0.5 * rows))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    # a type not introduced yet has no F1 to speak of: its cells stay blank
    future = [[r.type_steps[j] > i for j in range(cols)] for i in range(rows)]
    shown = [[float("nan") if future[i][j] else v for j, v in enumerate(row)]
             for i, row in enumerate(r.f1)]
    image = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(r.f1):
        for j, v in enumerate(row):
            ax.text(j, i, "not yet" if future[i][j] else f"{v:.2f}", ha="center", va="center",
                    fontsize=8, color="black" if v > 0.5 or future[i][j] else "white")
    ax.set_xticks(range(cols), [f"{t} (step {s})" for t, s in zip(r.types, r.type_steps)],
                  rotation=30, ha="right")
    ax.set_yticks(range(rows), [f"{i}: {n}" for i, n in enumerate(r.step_names[:rows])])
    ax.set_xlabel("entity type (introduced at)")
    ax.set_ylabel("after step")
    fig.colorbar(image, ax=ax, label="entity-level F1")
    ax.set_title("\n".join(headline(r)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
