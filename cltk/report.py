"""``cltk eval``: the forgetting matrix of any saved models (a run's stage exports by default), with
downstream tasks (``eval.tasks`` / ``--tasks``) scored by lm-eval beside perplexity."""

from __future__ import annotations

import json
from pathlib import Path

from transformers import AutoModelForCausalLM

from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.data.prepare import prepare
from cltk.forward import model_forward
from cltk.metrics import ForgettingReport, forgetting_report, format_table
from cltk.metrics_files import save_report
from cltk.models import ModelError, build_model, check_tokenizer_fits
from cltk.perplexity import evaluate_domains
from cltk.task_report import task_report
from cltk.tasks import TaskSettings, evaluate_tasks


def task_overrides(tasks: str | None, include_path: list[str] | None, limit: float | None) -> list[str]:
    """``cltk eval``'s ``--tasks``, ``--include-path`` and ``--limit`` as config overrides (paths
    absolute: they are relative to where the command runs, not to the config file)."""
    out = []
    if tasks is not None:
        out.append("eval.tasks=" + json.dumps([t.strip() for t in tasks.split(",") if t.strip()]))
    if include_path:
        out.append("eval.include_path=" + json.dumps([str(Path(d).resolve()) for d in include_path]))
    if limit is not None:
        out.append(f"eval.limit={int(limit) if limit >= 1 and limit == int(limit) else limit}")
    return out


def run_stage_dirs(cfg: RunConfig) -> list[Path]:
    """A run's stage exports in stage order."""
    return sorted(p for p in (cfg.out / "stages").glob("*") if (p / "config.json").is_file())


def evaluate_models(
    cfg: RunConfig,
    model_dirs: list[Path],
    out_dir: Path | None = None,
    stage_domains: list[str | list[str]] | None = None,
    start_dir: Path | None = None,
) -> ForgettingReport:
    """Perplexity of each saved model on every domain of ``cfg``; rows in the order given.

    Each rank loads a full copy of one model at a time and evaluates its share of every held-out set.
    ``stage_domains`` names the domain each model was trained on (default: read from the directory name
    ``<i>-<domain>[-b<k>]``) for the forgetting and plasticity figures.

    Row 0 (the starting model) is ``start_dir`` when given, else the configured model (``init_from``,
    ``gguf`` or the seeded inline config) unless ``eval.start`` is false.

    With ``eval.tasks`` each model is also scored on those lm-eval tasks (documents split over ranks),
    and lm-eval's results are kept in ``out_dir/stages/<model dir>/lm_eval.json`` (row 0:
    ``out_dir/start/lm_eval.json``).
    """
    dist.init()
    if not model_dirs:
        raise ModelError(f"no saved models to evaluate (looked in {cfg.out / 'stages'})")
    check_eval_inputs(model_dirs, start_dir, out_dir)
    tokenizer, domains = prepare(cfg)
    names = [d.name for d in cfg.domains]
    settings = TaskSettings.from_config(cfg)
    task_rows: list[dict] = []

    def row(model, where: str | None = None) -> list[float]:
        model = model.to(dist.device())
        check_tokenizer_fits(model, tokenizer)
        ppl = evaluate_domains(
            model_forward(model), [domains[n] for n in names], cfg.eval.batch_size, dist.device(),
            model,
        )
        if settings is not None:
            task_rows.append(evaluate_tasks(model, tokenizer, settings, out_dir / where
                                            if out_dir is not None and where else None))
        return [ppl[n] for n in names]

    start = None
    if start_dir is not None:
        start = row(AutoModelForCausalLM.from_pretrained(str(start_dir)), "start")
    elif cfg.eval.start:
        start = row(build_model(cfg, tokenizer), "start")
    start_tasks = task_rows.pop() if start is not None and settings is not None else None
    rows = [row(AutoModelForCausalLM.from_pretrained(str(d)), f"stages/{Path(d).name}")
            for d in model_dirs]
    if stage_domains is None:
        trained = [d.name for d in cfg.train_domains()]
        stage_domains = [_domain_of(Path(d).name, names, trained) for d in model_dirs]
    report = forgetting_report(
        rows, [Path(d).name for d in model_dirs], names, stage_domains, start=start,
        tasks=task_report(task_rows, start_tasks),
    )
    if dist.is_main():
        if out_dir is not None:
            save_report(report, out_dir, heatmap=cfg.eval.heatmap)
        print(format_table(report), flush=True)
    return report


def check_eval_inputs(model_dirs: list[Path], start_dir: Path | None, out_dir: Path | None) -> None:
    """Before any data is prepared: every model directory holds a config and readable weights, and
    ``out_dir`` is a directory cltk can write."""
    from cltk.model_files import check_weights_dir
    from cltk.rundir import check_writable_dir

    for d in [*model_dirs, *([start_dir] if start_dir is not None else [])]:
        if not (Path(d) / "config.json").is_file():
            raise ModelError(f"{d} is not a saved transformers model (no config.json)")
        check_weights_dir(Path(d), "cltk eval" if d != start_dir else "cltk eval --start")
    if out_dir is not None:
        check_writable_dir(Path(out_dir), "cltk eval --out")


def _domain_of(dirname: str, names: list[str], trained: list[str]) -> str | list[str]:
    stem = dirname.split("-", 1)[-1]
    if stem == "joint" and stem not in names:  # a joint-training run's one stage trains them all
        return trained
    for n in sorted(names, key=len, reverse=True):
        if stem == n or stem.startswith(n + "-b"):
            return n
    return stem
