"""The ``cltk`` command.

cltk train --config RUN.yaml [--resume] [--set train.lr=1e-4 ...]
deepspeed --num_gpus 2 --module cltk train --config RUN.yaml      # N ranks (any deepspeed launch)
cltk eval --config RUN.yaml [--models DIR ...] [--out DIR] [--start DIR | --no-start]
cltk prepare --config RUN.yaml                                    # tokenise every domain ahead of a run
cltk config-reference [--ner]                                     # every config key, as markdown
cltk bench --tier small --out DIR [--seeds 1 2] [--arms ...]      # every method, naive and joint
cltk ner --config NER.yaml [--set distill=null ...]               # continual NER (docs/ner.md)

A mistake the user can fix (:class:`cltk.errors.UserError`) is printed as one line, ``cltk: <message>``,
by rank 0, and the exit code is 2 (see ``OTHER_RANK_GRACE_S`` for the other ranks). Any other exception is a bug in cltk: its traceback is printed with a
line asking for a report that carries it, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from cltk.errors import UserError

EXIT_USER_ERROR = 2
EXIT_BUG = 1
# Seconds a rank other than 0 waits before reporting a user error itself. Every rank usually meets the
# same mistake; rank 0 reports it at once and the launcher (deepspeed, torchrun, srun --kill-on-bad-exit)
# then ends the other ranks, so the line appears once. A rank still alive after the wait met the mistake
# alone (rank 0 may be blocked in a collective) and reports it with its rank.
OTHER_RANK_GRACE_S = 10.0


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
    pr = sub.add_parser("prepare", help="tokenise every domain into the cache (train does it if needed)")
    pr.add_argument("--config", required=True, help="run config YAML")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("config-reference", help="print every run-config key as a markdown table")
    r.add_argument("--ner", action="store_true", help="the continual NER config's keys instead")
    b = sub.add_parser("bench", help="every method against naive and joint training (docs/benchmarks.md)")
    b.add_argument("--tier", default="small", help="small (a model cltk pre-trains) or real (SmolLM2-135M)")
    b.add_argument("--out", required=True, help="where every arm's run goes; finished arms are kept")
    b.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    b.add_argument("--arms", nargs="+", default=None, help="default: the tier's arms")
    b.add_argument("--ranks", type=int, default=1, help="ranks of each run (deepspeed --num_gpus)")
    b.add_argument("--steps", type=int, default=None, help="optimizer steps per stage (default: the tier's)")
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for every arm")
    b.add_argument("--base-set", action="append", default=[], metavar="KEY=VALUE",
                   help="for the starting model's pre-training (small tier)")
    b.add_argument("--page", default=None, help="the Markdown page to write (default OUT/bench.md)")
    n = sub.add_parser("ner", help="continual NER: new entity types step by step (docs/ner.md)")
    n.add_argument("--config", required=True, help="NER run config YAML (examples/ner/)")
    n.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    n.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _rank() -> int:
    if "torch" not in sys.modules:  # it failed before torch was imported: no process group yet
        return int(os.environ.get("RANK", "0"))
    from cltk import distributed as dist

    return dist.rank()


def _no_space(e: BaseException) -> BaseException | None:
    from cltk.diskfull import no_space_error

    return no_space_error(e)


def _report_user_error(e: UserError) -> int:
    rank = _rank()
    if rank == 0:
        print(f"cltk: {e}", file=sys.stderr, flush=True)
    else:
        time.sleep(OTHER_RANK_GRACE_S)
        print(f"cltk: rank {rank}: {e}", file=sys.stderr, flush=True)
    _leave_now_if_ranks(EXIT_USER_ERROR)
    return EXIT_USER_ERROR


def _leave_now_if_ranks(code: int) -> None:
    """With other ranks alive, exit at once with ``code``, skipping interpreter finalization.

    Tearing down a live process group at interpreter exit can end in ``std::terminate`` (a
    communicator thread still joinable), so the launcher would report SIGABRT instead of the
    user-error code. Every DeepSpeed shared-memory name was already unlinked at init, and the
    streams are flushed here.
    """
    if "torch" not in sys.modules:
        return
    from cltk import distributed as dist

    if dist.is_initialized() and dist.world_size() > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def main(argv: list[str] | None = None) -> int:
    """Run the ``cltk`` command; returns the exit code (0, 2 for a user error, 1 for a bug)."""
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except UserError as e:
        return _report_user_error(e)
    except Exception as e:
        full = _no_space(e)
        if full is not None:  # a full disk anywhere (data cache, tokenizer, logs): not a bug
            where = getattr(full, "filename", None) or "the device"
            return _report_user_error(
                UserError(
                    f"no space left on {where} ({full}); free space, then rerun (with --resume if "
                    "the run has a checkpoint)"
                )
            )
        traceback.print_exc()
        print(
            f"cltk: this is a bug in cltk (rank {_rank()}), not in your input; please report it "
            "with the traceback above",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_BUG


def _main(args: argparse.Namespace) -> int:
    if args.command == "ner":
        return _ner(args)
    if args.command == "bench":
        from cltk.bench import run_bench

        run_bench(args.tier, args.out, args.seeds, args.arms, args.ranks, args.steps, args.set,
                  args.base_set, args.page)
        return 0
    from cltk.config import describe
    from cltk.validate import load_config

    if args.command == "config-reference":
        print("| key | type | default | meaning |\n|---|---|---|---|")
        if args.ner:
            from cltk.ner.config import describe as describe_ner
        for key, tp, default, help_ in describe_ner() if args.ner else describe():
            cells = [f"`{key}`", tp, default, help_]
            print("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        return 0
    cfg = load_config(args.config, overrides=args.set)
    if args.command == "prepare":
        from cltk.data.prepare import prepare

        prepare(cfg)  # a UserError (a bad file, named with its line) is reported by main()
        return 0
    if args.command == "train":
        from cltk.continual import ContinualRun

        ContinualRun(cfg, resume=args.resume).run()
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


def _ner(args: argparse.Namespace) -> int:
    from cltk.ner import load_ner_config

    cfg = load_ner_config(args.config, overrides=args.set)  # a UserError is reported by main()
    from cltk.ner.run import run_ner  # DeepSpeed is imported once the config is known good

    run_ner(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
