"""The ``cltk`` command.

cltk train --config RUN.yaml [--resume] [--set train.lr=1e-4 ...]
deepspeed --num_gpus 2 --module cltk train --config RUN.yaml      # N ranks (any deepspeed launch)
cltk eval --config RUN.yaml [--models DIR ...] [--out DIR]
cltk config-reference                                             # every config key, as markdown
cltk ner --config NER.yaml [--set distill=null ...]               # continual NER (docs/ner.md)
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
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub.add_parser("config-reference", help="print every run-config key as a markdown table")
    n = sub.add_parser("ner", help="continual NER: new entity types step by step (docs/ner.md)")
    n.add_argument("--config", required=True, help="NER run config YAML (examples/ner/)")
    n.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    n.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "ner":
        return _ner(args)
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
    evaluate_models(cfg, models, Path(args.out) if args.out else cfg.out / "eval")
    return 0


def _ner(args: argparse.Namespace) -> int:
    from cltk.errors import UserError
    from cltk.ner import load_ner_config

    try:
        cfg = load_ner_config(args.config, overrides=args.set)
        from cltk.ner.run import run_ner  # DeepSpeed is imported once the config is known good

        run_ner(cfg)
    except UserError as e:
        print(f"cltk: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
