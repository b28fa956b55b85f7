"""LoRA per domain against full training: step time and size, and the quality benchmark's configs.

Step time (under the launcher; the figures in docs/benchmarks/lora.md come from it)::

    deepspeed --num_gpus 2 benchmarks/lora.py steps [--config examples/quickstart.yaml]
        [--steps 6 --rounds 3 --r 8]

builds two engines of the config's model (its ZeRO JSON, cltk's AdamW): one training every
parameter, one training a LoRA adapter (the config's ``lora`` section, or ``r``/``2r`` on the
attention projections), and runs ``--steps`` optimizer steps of each per round on the same random
token ids (step time does not depend on the text), in a rotated order each round, so a shared
machine's drifting load falls on both alike. Printed (rank 0): trainable parameters, median step
time, tokens/s, and the bytes of the adapter against those of the full ``save_pretrained`` export.

Quality arms (one process, writes two run configs that differ only in the ``lora`` section)::

    python benchmarks/lora.py arms --config examples/quickstart.yaml --base RUN/stages/00-code \
        --out DIR [--train-from 1 --steps N]
    python benchmarks/lora.py compare DIR/full DIR/lora [MORE_LORA_RUNS...]  # after training

``arms`` starts both from ``--base`` (``model.init_from``; its tokenizer), trains the config's
domains from index ``--train-from`` on and keeps the earlier ones as evaluation-only columns.
``compare`` prints ``cltk.metrics.compare_reports`` of full training and each LoRA run's views, the
router's accuracy, and the matrices.

A script, not a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml
from _common import VocabOnly, random_batches  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----- step time ----------------------------------------------------------------------------------


def _engine(cfg, lora: bool, total_steps: int):
    import peft

    from cltk.engine import build_engine
    from cltk.methods.lora.adapters import peft_config
    from cltk.models import build_model

    vocab = int((cfg.model.config or {}).get("vocab_size") or cfg.tokenizer.train.vocab_size)
    model = build_model(cfg, VocabOnly(vocab))
    if lora:
        model = peft.get_peft_model(model, peft_config(cfg, model))
    return build_engine(cfg, model, total_steps), vocab


def cmd_steps(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    from cltk import distributed as dist
    from cltk.engine import train_step
    from cltk.method import StageContext
    from cltk.methods.lora import LoraConfig
    from cltk.methods.lora.adapters import export_state_dicts, save_adapter
    from cltk.models import export_pretrained, parameter_counts
    from cltk.validate import load_config

    dist.init()
    cfg = load_config(args.config, overrides=args.set, world_size=dist.world_size())
    if cfg.lora is None:
        cfg.lora = LoraConfig(r=args.r, alpha=2.0 * args.r)
    total = args.steps * args.rounds + 2
    arms = {}
    for name in ("full", "lora"):
        torch.manual_seed(cfg.seed)
        arms[name], vocab = _engine(cfg, name == "lora", total)
    rng = np.random.default_rng(cfg.seed + dist.rank())

    def batches():
        return random_batches(rng, vocab, cfg)

    times: dict[str, list[float]] = {k: [] for k in arms}
    order = list(arms)
    for rnd in range(args.rounds + 1):  # round 0 warms up and is not timed
        for name in order[rnd % 2 :] + order[: rnd % 2]:
            ctx = StageContext(cfg, None, [], {}, None, Path("."), None, engine=arms[name])
            for _ in range(args.steps if rnd else 1):
                t0 = time.perf_counter()
                train_step(ctx, [], batches())
                if rnd:
                    times[name].append(time.perf_counter() - t0)
    tmp = Path(dist.broadcast_object(tempfile.mkdtemp(prefix="cltk-lora-bench-")))
    merged, adapter = export_state_dicts(arms["lora"])
    full_sd = (
        arms["full"]._zero3_consolidated_16bit_state_dict()
        if arms["full"].zero_optimization_stage() == 3
        else arms["full"].module.state_dict()
    )
    if dist.is_main():
        save_adapter(arms["lora"].module, adapter, tmp / "adapter", {"key": "bench"})
        export_pretrained(arms["full"].module, full_sd, None, tmp / "full")
        sizes = {
            "lora": (tmp / "adapter" / "adapter_model.safetensors").stat().st_size,
            "full": (tmp / "full" / "model.safetensors").stat().st_size,
        }
        tokens = cfg.global_batch(dist.world_size()) * cfg.data.seq_len
        rows = [
            "| arm | trainable parameters | median step (s) | tokens/s | saved per stage |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, engine in arms.items():
            trainable, total_params = parameter_counts(engine.module)
            med = statistics.median(times[name])
            rows.append(
                f"| {name} | {trainable:,} of {total_params:,} | {med:.3f} | "
                f"{tokens / med:,.0f} | {sizes[name] / 1024:,.1f} KB |"
            )
        ratio = statistics.median(times["lora"]) / statistics.median(times["full"])
        print(
            "\n".join(rows) + f"\n\nLoRA step time / full: {ratio:.2f} "
            f"({args.rounds} rounds x {args.steps} steps each, {dist.world_size()} ranks, "
            f"ZeRO {arms['full'].zero_optimization_stage()}, r={cfg.lora.r})",
            flush=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()


# ----- quality arms -------------------------------------------------------------------------------


def cmd_arms(args: argparse.Namespace) -> None:
    """Write ``OUT/full.yaml`` and ``OUT/lora.yaml``: the same run from ``--base``, with and without
    LoRA, the first ``--train-from`` domains evaluation-only."""
    src = Path(args.config).resolve()
    raw = yaml.safe_load(src.read_text())
    base = Path(args.base).resolve()
    if not (base / "config.json").is_file():
        raise ValueError(
            f"--base {base} is not a saved model directory (no config.json); give "
            "a stage export of a plain run, e.g. RUN/stages/00-code"
        )
    raw["model"] = {"init_from": str(base)}
    raw.pop("tokenizer", None)  # the base's own tokenizer
    raw["deepspeed"] = str((src.parent / raw["deepspeed"]).resolve())
    for i, d in enumerate(raw["domains"]):
        if i < args.train_from:
            d["eval_only"] = True
    if args.steps:
        raw["train"]["max_steps_per_stage"] = args.steps
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    for name in ("full", "lora"):
        arm = copy.deepcopy(raw)
        arm["name"], arm["output_dir"] = name, str(out / name)
        if name == "lora":
            arm["lora"] = {"r": args.r, "alpha": 2.0 * args.r, "base": "frozen", "per": "domain"}
        (out / f"{name}.yaml").write_text(yaml.safe_dump(arm, sort_keys=False))
        print(f"deepspeed --num_gpus 2 --module cltk train --config {out / f'{name}.yaml'}")


def cmd_compare(args: argparse.Namespace) -> None:
    """Markdown tables of a full run against one or more LoRA runs (named by their directory)."""
    from cltk.metrics import ForgettingReport, compare_reports, format_table
    from cltk.metrics_files import load_report

    full = load_report(args.full)
    runs = {Path(d).name: json.loads((Path(d) / "lora_report.json").read_text()) for d in args.lora}
    named = {"full sequential training": full}
    for run, rep in runs.items():
        for k, v in rep["views_full_sequence"].items():
            named[f"{run}: {k}"] = ForgettingReport.from_dict(v)
    print("Whole sequences:\n" + compare_reports(named))
    for run, rep in runs.items():
        if "views" in rep:
            print(f"\n{run}, tokens after the router's {rep['prefix_tokens']}-token prefix:")
            print(
                compare_reports({k: ForgettingReport.from_dict(v) for k, v in rep["views"].items()})
            )
            print(
                "router accuracy: "
                + ", ".join(
                    f"after {r['stage']} {r['accuracy']:.3f}"
                    for r in rep["router"]
                    if r["accuracy"] is not None
                )
            )
        for s in rep["stats"]:
            print(
                f"{s['stage']}: {s['trainable_parameters']:,} of {s['total_parameters']:,} "
                f"trainable, adapter {s['adapter_bytes'] / 1024:.1f} KB"
            )
    print("\nfull sequential training:\n" + format_table(full))
    for k, v in named.items():
        if k != "full sequential training" and args.matrices:
            print(f"\n{k}:\n" + format_table(v))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("steps", help="step time and size, full training vs LoRA (under deepspeed)")
    s.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--steps", type=int, default=6)
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--r", type=int, default=8, help="LoRA rank when the config has no lora section")
    s.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    a = sub.add_parser("arms", help="write the full and LoRA run configs of the quality benchmark")
    a.add_argument("--config", default=str(ROOT / "examples" / "quickstart.yaml"))
    a.add_argument("--base", required=True, help="the model both arms start from")
    a.add_argument("--out", required=True)
    a.add_argument("--train-from", type=int, default=1, help="domains before this index: eval only")
    a.add_argument("--r", type=int, default=8)
    a.add_argument("--steps", type=int, default=None, help="train.max_steps_per_stage of both arms")
    c = sub.add_parser("compare", help="tables of a full run and a LoRA run")
    c.add_argument("full", help="a full-training run's output directory")
    c.add_argument("lora", nargs="+", help="LoRA runs' output directories")
    c.add_argument("--matrices", action="store_true", help="also print every LoRA view's matrix")
    args = p.parse_args()
    {"steps": cmd_steps, "arms": cmd_arms, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    main()
