"""The ``cltk`` command.

cltk train --config RUN.yaml [--resume] [--set train.lr=1e-4 ...]
deepspeed --num_gpus 2 --module cltk train --config RUN.yaml      # N ranks (any deepspeed launch)
cltk eval --config RUN.yaml [--models DIR ...] [--out DIR] [--start DIR | --no-start]
cltk config-reference                                             # every config key, as markdown
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cltk", description="continual pre-training on DeepSpeed")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="run (or --resume) a continual pre-training run")
    t.add_argument("--config", required=True, help="run config YAML")
    t.add_argument("--resume", action="store_true", help="continue the run in output_dir")
    t.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=1e-4 (repeatable)",
    )
    t.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    e = sub.add_parser("eval", help="forgetting matrix of saved models (default: the run's stages)")
    e.add_argument("--config", required=True, help="run config YAML (domains, tokenizer, eval)")
    e.add_argument(
        "--models", nargs="*", default=None, help="saved model directories, in stage order"
    )
    e.add_argument("--out", default=None, help="write forgetting.{json,csv,png} here")
    row0 = e.add_mutually_exclusive_group()
    row0.add_argument(
        "--start",
        default=None,
        metavar="DIR",
        help="saved model for row 0 (the starting model); default: the config's model",
    )
    row0.add_argument(
        "--no-start", action="store_true", help="no row 0 (same as --set eval.start=false)"
    )
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub.add_parser("config-reference", help="print every run-config key as a markdown table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from cltk.config import ConfigError, describe, load_config

    if args.command == "config-reference":
        print("| key | type | default | meaning |\n|---|---|---|---|")
        for key, tp, default, help_ in describe():
            cells = [f"`{key}`", tp, default, help_]
            print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return 0
    try:
        cfg = load_config(args.config, overrides=args.set)
    except ConfigError as e:
        print(f"cltk: config error: {e}", file=sys.stderr)
        return 2
    if args.command == "train":
        from cltk.continual import ContinualRun, RunExistsError

        try:
            ContinualRun(cfg, resume=args.resume).run()
        except RunExistsError as e:
            print(f"cltk: {e}", file=sys.stderr)
            return 2
        return 0
    from cltk.report import evaluate_models, run_stage_dirs

    models = [Path(m) for m in args.models] if args.models else run_stage_dirs(cfg)
    if args.no_start:
        cfg.eval.start = False
    evaluate_models(
        cfg,
        models,
        Path(args.out) if args.out else cfg.out / "eval",
        start_dir=Path(args.start) if args.start else None,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
