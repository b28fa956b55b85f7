"""The loop over stages: build, train, checkpoint, export, evaluate, and the forgetting matrix at the end.

A stage is complete once ``OUT/stages/<i>-<name>/stage.json`` exists (written last, atomically). A resumed
run skips complete stages, restores the last checkpoint of the first incomplete one (engine, optimizer,
scheduler, RNG; the data position is the step number), and goes on.
"""

from __future__ import annotations

import gc
import json
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from cltk import checkpoint
from cltk import distributed as dist
from cltk.activations import enable_activation_checkpointing
from cltk.config import RunConfig
from cltk.data.prepare import check_sources, prepare
from cltk.data.sampler import Mix, Pool, StageSchedule, count_steps, mixture_pool
from cltk.engine import build_engine, describe_optimizer, release_engine, train_step
from cltk.forward import engine_forward
from cltk.grow import check_config, check_plan, complete_row
from cltk.lock import release as release_lock
from cltk.method import Method, StageContext
from cltk.metrics import ForgettingReport, forgetting_report, format_table
from cltk.metrics_files import save_report
from cltk.models import build_model, export_pretrained, parameter_counts
from cltk.perplexity import evaluate_domains
from cltk.plan import Stage, plan_json, plan_stages
from cltk.registry import build_methods
from cltk.rundir import check_global_batch, check_run_dir
from cltk.schedules import stage_lr_lambda, warmup_note
from cltk.start import start_record
from cltk.task_report import task_report
from cltk.task_runs import complete_tasks
from cltk.tasks import TaskScorer
from cltk.tracking import Tracker, log, peak_memory_mb

STAGE_FILE = "stage.json"


@dataclass
class RunResult:
    report: ForgettingReport
    output_dir: Path
    stage_dirs: list[Path]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _stage_done(stage_dir: Path) -> dict | None:
    f = stage_dir / STAGE_FILE
    return json.loads(f.read_text()) if f.is_file() else None


class ContinualRun:
    """A continual pre-training run over the config's domains (the object behind ``cltk train``).

    Args:
        cfg: a validated run config.
        resume: continue the run in ``cfg.output_dir`` from its last checkpoint.
        methods: methods to use instead of those the config names (for library users).
    """

    def __init__(self, cfg: RunConfig, resume: bool = False, methods: list[Method] | None = None):
        self.cfg, self.resume = cfg, resume
        self.methods = methods if methods is not None else build_methods(cfg)
        self.out = cfg.out
        self.ckpt_root = self.out / "checkpoints"

    # ----- setup ------------------------------------------------------------------------------------
    def _check_output_dir(self) -> None:
        check_run_dir(self.cfg, self.resume)

    def _write_run_files(self, stages: list[Stage]) -> None:
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(
                yaml.safe_dump(self.cfg.to_dict(), sort_keys=False)
            )
            (self.out / "plan.json").write_text(plan_json(stages))

    def _write_world(self) -> None:
        """``OUT/world.json``: where every rank ran (host, local rank), for checking a launch's placement."""
        ranks = dist.all_gather_object(
            {
                "rank": dist.rank(),
                "local_rank": dist.local_rank(),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
        )
        if dist.is_main():
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "world.json").write_text(
                json.dumps({"world_size": dist.world_size(), "ranks": ranks}, indent=1)
            )

    # ----- the run ----------------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            return self._run()
        finally:  # the output directory's lock (taken by check_run_dir), also when the run fails
            release_lock(self.out)

    def _run(self) -> RunResult:
        dist.init()
        log(
            f"{dist.world_size()} rank(s), backend {torch.distributed.get_backend()}, device {dist.device()}"
        )
        self._check_output_dir()
        if self.resume:  # appended domains grow the run; any other change to its finished part is refused
            check_config(self.cfg)
        check_sources(self.cfg)  # before anything is written into the output directory
        self._write_world()
        seed_everything(self.cfg.seed)
        self.tokenizer, self.domains = prepare(self.cfg)
        self.domain_names = [d.name for d in self.cfg.domains]
        # every prepared source by id: the domains, then the methods' extra sources (never a stage)
        self.source_names = list(self.domains)
        self.train_arrays = [self.domains[n].train.with_format("numpy") for n in self.source_names]
        self.stages = plan_stages(self.cfg, {n: len(d.train) for n, d in self.domains.items()})
        if self.resume:
            check_plan(self.out, self.stages)
        self.stage_steps = self.plan_steps()
        for m in self.methods:  # checks that need the data's sizes, before row 0 and any training
            m.check_plan(self._context(self.stages[0]))
        self._write_run_files(self.stages)
        self.tracker = Tracker(self.out, self.cfg.train.log_sequence_ids)
        resume_state = None
        if self.resume:
            tag = checkpoint.latest_tag(self.ckpt_root)
            resume_state = (tag, checkpoint.read_state(self.ckpt_root, tag)) if tag else None
        start = start_tasks = None
        if self.cfg.eval.start:  # row 0, measured once: a resumed run reads OUT/start.json
            record = start_record(self.cfg, self.tokenizer, self.domains, self.domain_names)
            start, start_tasks = record["perplexity_row"], record.get("tasks")
        rows: list[list[float]] = []
        self.task_rows: list[dict] = []  # each stage's downstream-task scores (eval.tasks)
        for stage in self.stages:
            sdir = self.stage_dir(stage)
            done = _stage_done(sdir)
            if done is not None:
                rows.append(complete_row(self.cfg, self.tokenizer, self.domains,
                                         self.domain_names, sdir, done, STAGE_FILE))
                self.task_rows.append(complete_tasks(self.cfg, self.tokenizer, sdir, done, STAGE_FILE))
                self._load_method_state(done, sdir)
                log(f"stage {stage.dirname}: already complete, skipped")
                continue
            tag = None
            if resume_state and resume_state[1]["stage"] == stage.index:
                tag = resume_state[0]
            rows.append(self.run_stage(stage, tag, resume_state[1] if tag else None))
        report = forgetting_report(
            rows, [s.name for s in self.stages], self.domain_names, [s.trains for s in self.stages],
            start=[start[n] for n in self.domain_names] if start else None,
            tasks=task_report(self.task_rows, start_tasks),
        )
        if dist.is_main():
            save_report(report, self.out, heatmap=self.cfg.eval.heatmap)
            print(format_table(report), flush=True)
        for m in self.methods:
            m.on_run_end(self.out, report)
        dist.barrier()
        return RunResult(report, self.out, [self.stage_dir(s) for s in self.stages])

    def stage_dir(self, stage: Stage) -> Path:
        return self.out / "stages" / stage.dirname

    def _context(self, stage: Stage) -> StageContext:
        prev = self.stage_dir(self.stages[stage.index - 1]) if stage.index > 0 else None
        return StageContext(
            self.cfg, stage, self.stages, self.domains, self.tokenizer, self.stage_dir(stage), prev,
            sources=self.source_names,
        )

    def _load_method_state(self, state: dict, directory: Path) -> None:
        """Restore every method's JSON state from ``state`` and its tensors from ``directory``."""
        tensors = checkpoint.load_rank_tensors(directory, dist.world_size())
        for m in self.methods:
            m.load_state_dict(state.get("methods", {}).get(m.name, {}))
            m.load_state_tensors(tensors.get(m.name, {}))

    def _method_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {m.name: m.state_tensors() for m in self.methods}

    def _mixes(self, stage: Stage) -> tuple[list[Mix], float, int | None]:
        """The stage's mixes (every method's, each at its own share), epochs and step cap."""
        c = self.cfg
        if stage.joint:
            return self._joint(stage)
        ctx = self._context(stage)
        return [mix for m in self.methods for mix in m.mixes(ctx)], c.train.epochs, \
            c.train.max_steps_per_stage

    def plan_steps(self) -> list[int]:
        """The optimizer steps of every stage of the run, counted once before the first stage
        (the LR schedule may span the run); no stage's schedule is built for it."""
        batch, counts = self.cfg.global_batch(dist.world_size()), []
        for stage in self.stages:
            mixes, epochs, max_steps = self._mixes(stage)
            counts.append(count_steps(len(stage.indices), mixes, batch, epochs, max_steps,
                                      stage.index))
        return counts

    def schedule(self, stage: Stage) -> StageSchedule:
        """The stage's batches: its own sequences and every method's mixes, each at its own share."""
        mixes, epochs, max_steps = self._mixes(stage)
        mixes = [mix.built() for mix in mixes]
        for mix in mixes:
            for p in mix.pools:
                prepared = 0 <= p.domain < len(self.source_names)
                if prepared == (p.rows is not None):
                    raise ValueError(
                        f"mix {mix.name!r}: pool id {p.domain} must name a prepared source "
                        f"(0..{len(self.source_names) - 1}) unless the pool brings its own rows, "
                        "and then lie outside them"
                    )
        return StageSchedule(
            mixture_pool(stage.domain_index, stage.indices, *_parts(self.train_arrays[stage.domain_index])),
            mixes,
            self.cfg.global_batch(dist.world_size()),
            epochs,
            max_steps,
            self.cfg.seed,
            stage.index,
        )

    def _joint(self, stage: Stage) -> tuple[list[Mix], float, int]:
        """A joint stage's mixes, epochs and steps: each domain's share of every batch is the share of
        the steps its own stage would take, and the stage takes as many steps as all of them."""
        c, batch = self.cfg, self.cfg.global_batch(dist.world_size())
        ids = [stage.domain_index, *(di for di, _ in stage.joint)]
        sizes = {di: len(self.train_arrays[di]) for di in ids}
        steps = {di: count_steps(n, [], batch, c.train.epochs, c.train.max_steps_per_stage, 0)
                 for di, n in sizes.items()}
        total = sum(steps.values())
        mixes = [Mix(f"joint {name}", [Pool(di, np.arange(sizes[di]))], steps[di] / total)
                 for di, name in stage.joint]
        # the first domain's own sequences are drawn epoch after epoch until the steps are done
        epochs = max(c.train.epochs, total * batch / sizes[stage.domain_index])
        return mixes, epochs, total

    def _stage_model(self, ctx: StageContext) -> torch.nn.Module:
        """The stage's model: its starting weights, each method's ``prepare_model``, train mode, and
        activation checkpointing when configured."""
        init_dir = ctx.prev_stage_dir
        for m in self.methods:
            init_dir = m.init_dir(ctx, init_dir)
        model = build_model(self.cfg, self.tokenizer, init_dir=init_dir)
        for m in self.methods:
            model = m.prepare_model(ctx, model)
        # from_pretrained returns a model in eval mode: dropout and checkpointing need train mode
        model.train()
        if self.cfg.train.activation_checkpointing:  # after prepare_model: LoRA's frozen base is known
            layers = enable_activation_checkpointing(model)
            log(f"stage {ctx.stage.dirname}: activation checkpointing on {layers} layers (non-reentrant)")
        return model

    def run_stage(self, stage: Stage, tag: str | None, state: dict | None) -> list[float]:
        c = self.cfg
        if tag is not None:
            check_global_batch(tag, state, c, dist.world_size())
        ctx = self._context(stage)
        ctx.schedule = schedule = self.schedule(stage)
        seed_everything(c.seed + stage.index)
        ctx.model = model = self._stage_model(ctx)
        for m in self.methods:
            m.on_stage_start(ctx)
        universal = tag is not None and state.get("world_size", 1) != dist.world_size()
        if universal:
            tag = checkpoint.to_universal(self.ckpt_root, tag)
        if len(schedule) != self.stage_steps[stage.index]:  # the plan counted it before the run
            raise RuntimeError(f"stage {stage.dirname}: {len(schedule)} steps, but "
                               f"{self.stage_steps[stage.index]} were planned")
        lr_fn = stage_lr_lambda(c.train, self.stage_steps, stage.index)
        note = warmup_note(c.train, self.stage_steps, stage.index)
        if note:
            log(f"stage {stage.dirname}: warning: {note}")
        engine = build_engine(c, model, len(schedule), load_universal=universal, lr_fn=lr_fn)
        ctx.engine = engine
        for m in self.methods:
            m.on_engine_ready(ctx)
        start = 0
        if tag is not None:
            state = checkpoint.load(engine, self.ckpt_root, tag)
            start = state["step"]
            self._load_method_state(state, self.ckpt_root / tag)
            log(f"stage {stage.dirname}: resumed from checkpoint {tag} at step {start}")
        self.tracker.truncate(stage.index, start)
        self._log_stage(stage, schedule, engine)
        self._train(ctx, schedule, start)
        if start < len(schedule) or tag is None or "-end" not in tag:
            self._save(ctx, f"s{stage.index:02d}-end", len(schedule))
        self._export(ctx)
        for m in self.methods:
            m.on_stage_end(ctx)
        checkpoint.save_rank_tensors(ctx.stage_dir, self._method_tensors())
        ppl = evaluate_domains(
            engine_forward(engine),
            [self.domains[n] for n in self.domain_names],
            c.eval.batch_size,
            engine.device,
            engine.module,
        )
        peak = dist.all_gather_object(peak_memory_mb())  # after training and export, before eval
        for m in self.methods:
            ppl = m.evaluate(ctx, ppl)
        tasks: dict = {}  # downstream tasks on the model in memory, after its export (cltk.task_runs)
        TaskScorer(c, self.tokenizer, tasks, out_dir=ctx.stage_dir, label=f"stage {stage.dirname}")(
            engine)
        self.task_rows.append(tasks.get("tasks") or {})
        log(
            f"stage {stage.dirname}: perplexity "
            + ", ".join(f"{k} {v:.2f}" for k, v in ppl.items())
        )
        if dist.is_main():
            record = {
                "stage": stage.index,
                "name": stage.name,
                "domain": stage.domain,
                "perplexity": ppl,
                "steps": len(schedule),
                "precision": "bf16" if engine.bfloat16_enabled() else "fp32",
                "optimizer": describe_optimizer(engine),
                "activation_checkpointing": c.train.activation_checkpointing,
                "attn_implementation": getattr(engine.module.config, "_attn_implementation", None),
                "world_size": dist.world_size(),
                "peak_memory_mb": peak,  # per rank: host RSS and device memory of the run so far
                "methods": {m.name: m.state_dict() for m in self.methods},
                **tasks,
            }
            checkpoint.write_atomic(ctx.stage_dir / STAGE_FILE, json.dumps(record, indent=1))
        dist.barrier()
        del ctx, model
        release_engine(engine)
        del engine
        gc.collect()  # the engine's own cycles, now that nothing global holds them
        return [ppl[n] for n in self.domain_names]

    def _log_stage(self, stage: Stage, schedule: StageSchedule, engine: Any) -> None:
        trainable, total = parameter_counts(engine.module)
        log(
            f"stage {stage.dirname}: {len(schedule)} steps of {schedule.global_batch} sequences "
            f"x {self.cfg.data.seq_len} tokens; {trainable:,} of {total:,} parameters trainable"
        )
        for mix, n in zip(schedule.mixes, schedule.n_mix):
            size = sum(len(p.indices) for p in mix.pools)
            ids = sorted({p.domain for p in mix.pools})
            log(f"stage {stage.dirname}: mixing {n} of every {schedule.global_batch} sequences "
                f"(share {mix.share:g}) from {mix.name} ({size:,} sequences, source ids {ids})")

    def _train(self, ctx: StageContext, schedule: StageSchedule, start: int) -> None:
        c, stage = self.cfg, ctx.stage
        from tqdm.auto import tqdm

        show = (
            dist.is_main() and sys.stderr.isatty()
        )  # in logs (not a terminal) the log lines suffice
        bar = tqdm(
            total=len(schedule),
            initial=start,
            desc=stage.name,
            disable=not show,
            dynamic_ncols=True,
            leave=False,
        )
        tokens_per_step = c.global_batch(dist.world_size()) * c.data.seq_len
        for step in range(start, len(schedule)):
            ctx.step = step
            t0 = time.perf_counter()
            micro = schedule.micro_batches(
                step, dist.rank(), dist.world_size(), c.train.micro_batch_size
            )
            self.tracker.sequence_ids(stage.index, step, [list(x) for mb in micro for x in mb])
            # a short last step: pad each micro-batch to full size with a row of the step whose loss
            # is ignored, so every rank runs the same shapes (ZeRO 3 and gathered terms need that)
            pad = schedule.global_step(step)[:1]
            size = c.train.micro_batch_size
            metrics = train_step(
                ctx,
                self.methods,
                [self._tensor(mb + pad * (size - len(mb)), schedule) for mb in micro],
                valid_rows=[len(mb) for mb in micro],
                step_rows=schedule.step_size(step),
            )
            seconds = time.perf_counter() - t0
            self.tracker.step(stage.index, stage.name, step, metrics, tokens_per_step, seconds)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}")
            if (step + 1) % c.train.log_every == 0 or step + 1 == len(schedule):
                bar.clear()
                log(
                    f"stage {stage.dirname} step {step + 1}/{len(schedule)} loss {metrics['loss']:.4f} "
                    f"lr {metrics['lr']:.2e} {tokens_per_step / seconds:,.0f} tok/s"
                )
            every = c.train.checkpoint_every
            if every and (step + 1) % every == 0 and step + 1 < len(schedule):
                self._save(ctx, f"s{stage.index:02d}-step{step + 1:06d}", step + 1)
            _fault_injection(self.out, stage.index, step + 1)
        bar.close()

    def _tensor(self, items: list[tuple[int, int]], schedule: StageSchedule) -> torch.Tensor:
        rows = []
        for d, i in items:  # a prepared source's windows, or the rows a mix's pool brought
            own = schedule.rows(d)
            rows.append((own if own is not None else self.train_arrays[d])[i]["input_ids"])
        return torch.as_tensor(np.stack(rows).astype(np.int64))

    def _save(self, ctx: StageContext, tag: str, step: int) -> None:
        state = {
            "stage": ctx.stage.index,
            "stage_name": ctx.stage.name,
            "step": step,
            "order": ctx.stage.index * 10**9 + step,
            "world_size": dist.world_size(),
            "global_batch": self.cfg.global_batch(dist.world_size()),
            "methods": {m.name: m.state_dict() for m in self.methods},
        }
        checkpoint.save(
            ctx.engine, self.ckpt_root, tag, state, self.cfg.train.keep_checkpoints, self._method_tensors()
        )
        log(f"checkpoint {tag} saved")

    def _export(self, ctx: StageContext) -> None:
        """``save_pretrained`` of the stage's weights (gathered under ZeRO 3) into the stage directory."""
        if any([m.export(ctx) for m in self.methods]):
            dist.barrier()
            return
        engine = ctx.engine
        if engine.zero_optimization_stage() == 3:
            state_dict = engine._zero3_consolidated_16bit_state_dict()
        else:
            state_dict = engine.module.state_dict() if dist.is_main() else None
        if dist.is_main():
            export_pretrained(engine.module, state_dict, self.tokenizer, ctx.stage_dir)
        dist.barrier()


def _parts(train) -> tuple[list, list]:
    """The row ranges and weights of a domain's mixture parts (one part unless it mixes sources)."""
    return getattr(train, "sources", [(0, len(train))]), getattr(train, "weights", [1.0])


def _fault_injection(out: Path, stage: int, steps_done: int) -> None:
    """Testing aid: ``CLTK_KILL_AT=STAGE:STEP[:RANK]`` SIGKILLs this rank once STEP steps of STAGE are done.

    Used by the resume and fault-tolerance tests to stop a run at an exact place, as a crash would. It fires
    once per output directory (a marker file remembers it), so a requeued job with the same environment
    goes on.
    """
    spec = os.environ.get("CLTK_KILL_AT")
    if not spec:
        return
    parts = [int(x) for x in spec.split(":")]
    marker = out / f".cltk-killed-{spec.replace(':', '-')}"
    if parts[:2] == [stage, steps_done] and (len(parts) < 3 or parts[2] == dist.rank()):
        if marker.exists():
            return
        marker.touch()
        log(f"CLTK_KILL_AT={spec}: killing rank {dist.rank()}")
        os.kill(os.getpid(), signal.SIGKILL)


def train(cfg: RunConfig, resume: bool = False) -> RunResult:
    """Run a continual pre-training run from a validated config (the library's front door)."""
    return ContinualRun(cfg, resume=resume).run()
