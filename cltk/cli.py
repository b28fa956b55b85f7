"""The ``cltk`` command.

cltk train --config RUN.yaml [--resume] [--set train.lr=1e-4 ...]
deepspeed --num_gpus 2 --module cltk train --config RUN.yaml      # N ranks (any deepspeed launch)
cltk eval --config RUN.yaml [--models DIR ...] [--out DIR] [--start DIR | --no-start]
          [--tasks T1,T2 [--include-path DIR] [--limit N]]      # + downstream tasks (lm-eval)
cltk prepare --config RUN.yaml                                    # tokenise every domain ahead of a run
cltk config-reference [--ner]                                     # every config key, as markdown
cltk plan --memory --config RUN.yaml --world-size 16 --gpu-memory 80  # per-rank memory; does it fit?
cltk bench --tier small --out DIR [--seeds 1 2] [--arms ...]      # every method, naive and joint
cltk ner --config NER.yaml [--set distill=null ...]               # continual NER (docs/ner.md)

A mistake the user can fix (:class:`cltk.errors.UserError`) is printed as one line, ``cltk: <message>``,
by rank 0, and the exit code is 2 (see ``OTHER_RANK_GRACE_S`` for the other ranks). Any other exception is a bug in cltk: its traceback is printed with a
line asking for a report that carries it, and the exit code is 1. A collective that fails because another
rank died is neither: one line says so and how to resume, and the exit code is 3.
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
EXIT_PEER_LOST = 3  # another rank died: not this rank's mistake, not a bug; rerun with --resume
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
    e.add_argument("--tasks", default=None, metavar="T1,T2",
                   help="lm-eval tasks to score too (eval.tasks); needs the [eval] extra")
    e.add_argument("--include-path", nargs="+", default=None, metavar="DIR",
                   help="directories of your own lm-eval task YAMLs (eval.include_path)")
    e.add_argument("--limit", type=float, default=None, help="lm-eval limit (eval.limit)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    pr = sub.add_parser("prepare", help="tokenise every domain into the cache (train does it if needed)")
    pr.add_argument("--config", required=True, help="run config YAML")
    pr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r = sub.add_parser("config-reference", help="print every run-config key as a markdown table")
    r.add_argument("--ner", action="store_true", help="the continual NER config's keys instead")
    pl = sub.add_parser("plan", help="what a run needs before it is launched (--memory: per-rank memory)")
    pl.add_argument("--config", required=True, help="run config YAML")
    pl.add_argument("--memory", action="store_true", required=True,
                    help="per-rank memory by part, whether it fits, and the smallest change if not")
    pl.add_argument("--world-size", type=int, default=1, help="ranks (GPUs) of the run")
    pl.add_argument("--gpus-per-node", type=int, default=8)
    pl.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                    help="memory of one GPU in GiB (e.g. 80): say whether the run fits")
    pl.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                    help="plan for GPUs (default) or for CPU ranks (host memory, fp32)")
    pl.add_argument("--measured", default=None, metavar="OUT",
                    help="a finished run's output_dir: compare with its stage.json peaks")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    b = sub.add_parser("bench", help="every method against naive and joint training (docs/benchmarks.md)")
    b.add_argument("--tier", default="small", help="small (a model cltk pre-trains), real "
                   "(SmolLM2-135M) or scratch (the quickstart's model from scratch)")
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
        if "EADDRINUSE" in str(e) and "torch" in sys.modules:  # the rendezvous port is taken
            return _report_user_error(UserError(
                f"the rendezvous port MASTER_PORT={os.environ.get('MASTER_PORT', '?')} is already in "
                "use on this host (another job, or a previous launch still closing); launch with "
                "another port (deepspeed --master_port, torchrun --master_port)"))
        if _peer_lost(e):
            print(
                f"cltk: rank {_rank()}: another rank died (its process ended or its host went "
                f"away: {_first_line(e)}); this rank stops too. Find the first error in that rank's "
                "log (or the kill: out of memory, a preempted node), then rerun the same command "
                "with --resume: the run continues from its last checkpoint",
                file=sys.stderr,
                flush=True,
            )
            _leave_now_if_ranks(EXIT_PEER_LOST)
            return EXIT_PEER_LOST
        traceback.print_exc()
        print(
            f"cltk: this is a bug in cltk (rank {_rank()}), not in your input; please report it "
            "with the traceback above",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_BUG


# A collective failed because another rank is gone (the communication library's words for it)
_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe",
              "connection refused", "socket closed", "nccl communicator was aborted",
              "remote process exited", "ncclremoteerror")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _peer_lost(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is a collective that failed because a peer rank died."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as td

    seen: BaseException | None = e
    while seen is not None:
        text = str(seen).lower()
        backend_error = isinstance(seen, getattr(td, "DistBackendError", ()))
        if any(w in text for w in _PEER_LOST) and (backend_error or "gloo" in text or "nccl" in text
                                                   or isinstance(seen, RuntimeError)):
            return td.is_initialized() and td.get_world_size() > 1
        seen = seen.__cause__ or seen.__context__
    return False


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
    if args.command == "eval":
        from cltk.report import task_overrides

        args.set = args.set + task_overrides(args.tasks, args.include_path, args.limit)
    if args.command == "plan":
        cfg = load_config(args.config, overrides=args.set, world_size=args.world_size)
        from cltk.memplan import plan_memory

        measured = Path(args.measured) if args.measured else None
        print(plan_memory(cfg, args.world_size, args.gpus_per_node, args.device, args.gpu_memory,
                          measured))
        return 0
    cfg = load_config(args.config, overrides=args.set)
    if args.command == "prepare":
        from cltk.data.prepare import prepare
        from cltk.rundir import check_writable_dir

        check_writable_dir(cfg.cache_dir, "data.cache_dir")  # before any tokenizer is trained
        check_writable_dir(cfg.out, "output_dir")  # the run's tokenizer and data.json go there
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
