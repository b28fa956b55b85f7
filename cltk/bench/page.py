"""The page ``cltk bench`` writes: one table comparing every arm (mean and half-spread over seeds), the
joint-training gap, throughput and peak memory, each arm's forgetting matrix and heatmap, one summary
plot, and the command, versions and machine that produced them."""

from __future__ import annotations

import os
import platform
import shutil
from datetime import date
from pathlib import Path

from cltk.bench.arms import ARMS, Tier, overrides


def _stats(values: list[float | None]) -> tuple[float, float] | None:
    """Mean and half-spread (half of max - min) of the values that exist."""
    vals = [v for v in values if v is not None]
    if not vals:
        return None
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2


def _fmt(values: list[float | None], digits: int = 1, suffix: str = "", signed: bool = False) -> str:
    st = _stats(values)
    if st is None:
        return "n/a"
    mean, half = st
    sign = "+" if signed else ""
    if len([v for v in values if v is not None]) == 1:
        return f"{mean:{sign}.{digits}f}{suffix}"
    return f"{mean:{sign}.{digits}f} ± {half:.{digits}f}{suffix}"


def _pct(v: float | None) -> float | None:
    return None if v is None else 100.0 * v


def summary_rows(results: dict[str, dict[int, dict]], seeds: list[int]) -> list[dict]:
    """Per arm, per seed: the figures of the table (the joint gap read against the same seed)."""
    out = []
    for arm, by_seed in results.items():
        row: dict = {"arm": arm}
        for s in seeds:
            r, rep = by_seed[s], by_seed[s]["report"]
            naive = results["naive"][s] if "naive" in results else None
            joint = results["joint"][s]["report"] if "joint" in results else None
            final = rep["average_final_perplexity"]
            row.setdefault("final", []).append(final)
            row.setdefault("forgetting", []).append(rep["mean_forgetting"])
            row.setdefault("plasticity", []).append(rep["mean_plasticity"])
            row.setdefault("lost", []).append(_pct(rep.get("mean_relative_start_forgetting")))
            row.setdefault("gap", []).append(
                None if joint is None else 100.0 * (final / joint["average_final_perplexity"] - 1))
            row.setdefault("tokens_per_s", []).append(r["tokens_per_s"])
            row.setdefault("per_rank", []).append(r["tokens_per_s"] / r["ranks"])
            row.setdefault("step", []).append(
                r["step_s"] / naive["step_s"] if naive and naive["step_s"] else None)
            n = r.get("parameters")
            row.setdefault("tflops", []).append(6e-12 * n * r["tokens_per_s"] / r["ranks"] if n else None)
            peak = _peak_flops(r.get("precision"))
            row.setdefault("mfu", []).append(
                100.0 * row["tflops"][-1] * 1e12 / peak if peak and n else None)
            row.setdefault("rss", []).append(r["peak_rss_mb"])
            row.setdefault("device", []).append(r["peak_device_mb"])
            tasks = rep.get("tasks") or {}
            row.setdefault("task_lost", []).append(  # lm-eval tasks (eval.tasks), in points
                None if tasks.get("mean_lost") is None else 100.0 * tasks["mean_lost"])
            row["task_names"] = [f"{t} {m}" for t, m in zip(tasks.get("tasks", []),
                                                             tasks.get("metrics", []))]
        out.append(row)
    return out


# dense bf16 peak FLOP/s per GPU, for model FLOPs utilisation (6 x parameters x tokens/s against it)
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12}


def _peak_flops(precision: str | None) -> float | None:
    import torch

    if precision != "bf16" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def table(rows: list[dict]) -> str:
    device = any(v is not None for r in rows for v in r["device"])
    mfu = any(v is not None for r in rows for v in r["mfu"])
    tasks = next((r["task_names"] for r in rows if any(v is not None for v in r["task_lost"])), None)
    head = ("| arm | final avg perplexity | forgetting (trained) | plasticity | lost of what it knew | "
            "gap to joint | tokens/s | tokens/s/rank | model TFLOP/s/rank | step time vs naive | "
            "peak RSS/rank MiB |" + (" peak device MiB |" if device else "") + (" MFU |" if mfu else "")
            + (f" lost of what it knew on tasks ({', '.join(tasks)}; points) |" if tasks else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [
            f"**{r['arm']}**", _fmt(r["final"]), _fmt(r["forgetting"], signed=True),
            _fmt(r["plasticity"]), _fmt(r["lost"], suffix="%", signed=True),
            _fmt(r["gap"], suffix="%", signed=True), _fmt(r["tokens_per_s"], 0),
            _fmt(r["per_rank"], 0), _fmt(r["tflops"], 3), _fmt(r["step"], 2, "x"), _fmt(r["rss"], 0),
        ] + ([_fmt(r["device"], 0)] if device else []) + ([_fmt(r["mfu"], 1, "%")] if mfu else []) \
          + ([_fmt(r["task_lost"], 1, signed=True)] if tasks else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix(by_seed: dict[int, dict], seeds: list[int]) -> str:
    """The arm's forgetting matrix, each cell the mean ± half-spread over seeds."""
    reps = [by_seed[s]["report"] for s in seeds]
    names = reps[0]["domain_names"]
    tasks = [r.get("tasks") for r in reps]  # lm-eval task columns (eval.tasks), after the domains
    heads = [f"{t} ({m})" for t, m in zip(tasks[0]["tasks"], tasks[0]["metrics"])] \
        if all(tasks) else []
    lines = ["| after stage | " + " | ".join(names + heads) + " |",
             "|---|" + "---|" * (len(names) + len(heads))]
    labelled = []
    if reps[0].get("start") is not None:
        labelled.append(("start", [r["start"] for r in reps],
                         [t["start"] or [None] * len(heads) for t in tasks] if heads else []))
    for i, stage in enumerate(reps[0]["stage_names"]):
        labelled.append((stage, [r["perplexity"][i] for r in reps],
                         [t["scores"][i] for t in tasks] if heads else []))
    for label, seed_rows, task_rows in labelled:
        cells = [_fmt([row[j] for row in seed_rows]) for j in range(len(names))]
        cells += [_fmt([row[k] for row in task_rows], 3) for k in range(len(heads))]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_plot(rows: list[dict], path: Path, title: str) -> None:
    """Two panels, one point per arm with its seed spread: forgetting against plasticity (trained
    domains), and final average perplexity against what was lost of the starting model's knowledge."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.2))
    FigureCanvasAgg(fig)
    panels = (("forgetting", "plasticity", "mean forgetting of trained domains (perplexity rise)",
               "mean plasticity (perplexity right after own stage)"),
              ("lost", "final", "lost of what it knew (evaluation-only domains, % perplexity rise)",
               "final average perplexity of trained domains"))
    for k, (xk, yk, xl, yl) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        bound = None
        for i, r in enumerate(rows):
            x, y = _stats(r[xk]), _stats(r[yk])
            if x is None or y is None:
                bound = y[0] if y is not None and r["arm"] == "joint" else bound
                continue
            ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], fmt="o", ms=4, capsize=2,
                        color=f"C{i % 10}")  # an arm's colour is the same in both panels
            ax.annotate(r["arm"], (x[0], y[0]), textcoords="offset points", fontsize=8,
                        xytext=(4, 3 if i % 2 else -10))  # alternate sides: fewer overlaps
        if bound is not None:  # joint training has no sequential forgetting: a line at its level
            ax.axhline(bound, ls="--", c="grey", lw=1)
            ax.text(ax.get_xlim()[1], bound, "joint ", ha="right", va="bottom", fontsize=8, color="grey")
        ax.set_xlabel(xl, fontsize=9)
        ax.set_ylabel(yl, fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title + " (lower-left is better; bars: half-spread over seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def _versions() -> str:
    import deepspeed
    import peft
    import torch
    import transformers

    return (f"Python {platform.python_version()}, torch {torch.__version__}, "
            f"deepspeed {deepspeed.__version__}, transformers {transformers.__version__}, "
            f"peft {peft.__version__}")


def _machine() -> str:
    import torch

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB memory"
    except (OSError, ValueError, IndexError):
        pass
    gpu = (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
           if torch.cuda.is_available() else ", no GPU")
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}"


def start_section(results: dict[str, dict[int, dict]], seeds: list[int],
                  base: dict[int, dict] | None) -> list[str]:
    """What the starting model knew: row 0 on every domain (and the base's own training, if any)."""
    reps = [results["naive"][s]["report"] for s in seeds]
    if reps[0].get("start") is None:
        return []
    names = reps[0]["domain_names"]
    lines = ["## The starting model", ""]
    if base:
        b = [base[s] for s in seeds if s in base]
        lines += [f"Pre-trained by cltk for {b[0]['steps']} steps on "
                  f"{', '.join(b[0]['report']['domain_names'])} (one per seed): its own held-out "
                  f"perplexity there {_fmt([x['report']['average_final_perplexity'] for x in b])}.", ""]
    only = set(reps[0].get("eval_only_domains", []))
    lines += ["Its perplexity on each domain before any stage (row 0 of every arm's matrix; "
              "evaluation-only domains marked *): what it knew, and what every arm starts from.", "",
              "| " + " | ".join(f"{n}{' *' if n in only else ''}" for n in names) + " |",
              "|" + "---|" * len(names),
              "| " + " | ".join(_fmt([r["start"][j] for r in reps]) for j in range(len(names))) + " |", ""]
    return lines


def write_page(results: dict[str, dict[int, dict]], tier: Tier, seeds: list[int], command: str,
               page: Path, figures: Path, base: dict[int, dict] | None = None) -> str:
    """Write the Markdown page (and its figures under ``figures``); returns the summary table."""
    rows = summary_rows(results, seeds)
    rel = os.path.relpath(figures, page.parent)
    summary_plot(rows, figures / "summary.png", f"cltk bench, {tier.name} tier")
    first = results["naive"][seeds[0]]
    steps, ranks = first["steps"], first["ranks"]
    runs = [r for by_seed in results.values() for r in by_seed.values()]
    commits = ", ".join(sorted({r.get("commit", "?") for r in runs}))
    dates = sorted({r.get("date") or date.today().isoformat() for r in runs})
    when = dates[0] if len(dates) == 1 else f"{dates[0]} to {dates[-1]}"
    lines = [
        f"# cltk bench: {tier.name} tier",
        "",
        f"{tier.about}. Every arm trains the same stages for the same steps ({steps} in all), batch and "
        f"seeds ({', '.join(map(str, seeds))}); each figure is the mean over seeds ± half the spread "
        "(a difference smaller than the spread is noise).",
        "",
        f"{tier.data}.",
        "",
        "```",
        command,
        "```",
        "",
        f"Measured {when} on {_machine()}, {ranks} rank(s); cltk {commits}; {_versions()}.",
        "",
        table(rows),
        "",
        f"![forgetting against plasticity]({rel}/summary.png)",
        "",
        "- **final avg perplexity**: mean over the trained domains of the last row. **forgetting**: mean "
        "rise of each trained domain's perplexity from just after its own stage to the end. "
        "**plasticity**: mean perplexity right after each domain's own stage. **lost of what it knew**: "
        "mean relative rise on the evaluation-only domains from the starting model (row 0) to the end. "
        "**gap to joint**: final avg perplexity against joint training's, same seed. Definitions: "
        "[docs/metrics.md](../metrics.md).",
        *(["- **lost of what it knew on tasks**: the downstream tasks' (lm-eval, `eval.tasks`) "
           "mean drop from the starting model to the end, in points of the task's metric (accuracy "
           "x 100); positive is lost. Each arm's matrix gives the tasks' scores after every stage."]
          if any(v is not None for r in rows for v in r["task_lost"]) else []),
        "- Each seed holds out its own documents (and, in the small tier, pre-trains its own base), so "
        "absolute perplexities can move more between seeds than between arms: compare arms by the "
        "paired columns (gap to joint, step time against naive: each read against the same seed) or "
        "seed by seed in the matrices' runs.",
        "- **tokens/s**: median over the steps after the first stage, all ranks; **step time vs "
        "naive**: the same median against naive's, same seed. **model TFLOP/s/rank**: 6 x parameters "
        "x tokens/s per rank (attention left out); MFU on GPUs against the card's dense bf16 peak. "
        "**peak RSS/rank**: the largest resident set of any rank over the run (and of device memory "
        "on GPUs).",
        "",
        *start_section(results, seeds, base),
        "## Each arm",
        "",
    ]
    for arm, by_seed in results.items():
        src = by_seed[seeds[0]].get("dir")
        sets = " ".join(f"--set {o!r}" for o in overrides(arm, tier)) or "(no override)"
        lines += [f"### {arm}", "", f"{ARMS[arm][1]}: `{sets}`", "", matrix(by_seed, seeds), ""]
        png = Path(src) / "forgetting.png" if src else None
        if png is not None and png.is_file():
            shutil.copyfile(png, figures / f"{arm}.png")
            lines += [f"![{arm}, seed {seeds[0]}]({rel}/{arm}.png)", ""]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text("\n".join(lines) + "\n")
    return table(rows)
