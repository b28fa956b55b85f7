"""Continual NER: distillation (AddNER / ExtendNER) against naive fine-tuning, same budget, seeds.

    python benchmarks/ner_compare.py --config examples/ner/brown.yaml --out runs/ner-compare \
        --seeds 0 1 [--set train.steps=150 ...]

Runs the config once per variant x method x seed, one process each (``cltk ner``), with the same
data, steps, updates and batch sizes; naive fine-tuning is the same run with ``distill: null`` (no
teacher: ExtendNER trains plain CE on the new data, whose O hides the old types; AddNER's old layers
get no loss). Prints a markdown table: mean over seeds with the spread (min..max) of the final F1
per type, mean final F1, mean forgetting and mean plasticity, and copies each method's seed-0 F1
matrix picture into ``--figures`` if given. One tokenizer is trained first and shared by every run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from cltk.data.tokenizer import train_tokenizer
from cltk.ner import load_ner_config
from cltk.ner.data import load_source


def _cell(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.3f} ({min(values):.3f}..{max(values):.3f})" if len(values) > 1 else f"{mean:.3f}"


def _partial(report: dict) -> bool:
    return len(report["f1"]) < len(report["step_names"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--out", required=True, help="one run directory per variant/method/seed here")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--variants", nargs="+", default=["extendner", "addner"])
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--figures", default=None, help="copy the seed-0 ner_f1.png of each method here")
    p.add_argument("--lock", default=None, help="run each run under flock LOCK (a shared machine)")
    a = p.parse_args()
    out = Path(a.out).resolve()
    sets = list(a.set)
    cfg = load_ner_config(a.config, overrides=sets)
    if cfg.tokenizer.vocab_size:
        # one tokenizer for every run: BPE training breaks ties differently from process to process
        tok = out / "tokenizer"
        if not (tok / "tokenizer.json").is_file():
            declared = {t: s.name for s in cfg.steps for t in s.types}
            sents = [w for i, st in enumerate(cfg.steps) for w, _ in
                     load_source(st.data, st.types, declared, cfg.resolve, f"steps[{i}].data")]
            train_tokenizer([" ".join(w) for w in sents], cfg.tokenizer.vocab_size, tok)
        sets += ["tokenizer.vocab_size=null", f"tokenizer.path={tok}"]
    results: dict[tuple[str, str], list[dict]] = {}
    for variant in a.variants:
        for method in ("distill", "naive"):
            for seed in a.seeds:
                run = out / f"{variant}-{method}-seed{seed}"
                done = run / "ner_f1.json"
                if not done.is_file() or _partial(json.loads(done.read_text())):
                    shutil.rmtree(run, ignore_errors=True)
                    run_sets = [*sets, f"output_dir={run}", f"seed={seed}", f"variant={variant}"]
                    if method == "naive":
                        run_sets.append("distill=null")
                    cmd = ["flock", a.lock] if a.lock else []
                    cmd += [sys.executable, "-m", "cltk", "ner", "--config", a.config]
                    for s in run_sets:
                        cmd += ["--set", s]
                    print("running:", " ".join(cmd), file=sys.stderr, flush=True)
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL,
                                   env={**os.environ, "PYTHONUNBUFFERED": "1"})
                results.setdefault((variant, method), []).append(
                    json.loads((run / "ner_f1.json").read_text()))
                if a.figures and seed == a.seeds[0]:
                    fig = Path(a.figures)
                    fig.mkdir(parents=True, exist_ok=True)
                    shutil.copy(run / "ner_f1.png", fig / f"ner_f1_{variant}_{method}.png")
    types = next(iter(results.values()))[0]["types"]
    print(f"| method | {' | '.join(f'final F1 {t}' for t in types)} | mean final F1 | "
          "mean forgetting | mean plasticity |")
    print("|---|" + "---:|" * (len(types) + 3))
    for (variant, method), reps in results.items():
        cells = [_cell([r["final"][t] for r in reps]) for t in types]
        cells += [_cell([r[k] for r in reps])
                  for k in ("mean_final_f1", "mean_forgetting", "mean_plasticity")]
        print(f"| {variant} {method} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
