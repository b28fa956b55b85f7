"""The run directory before any work, and a full disk while writing to it.

Before a run starts (:func:`check_run_dir`):

- ``output_dir`` (and ``data.cache_dir``) must be directories cltk can create and write;
- a directory that holds a run (a checkpoint or a finished stage) is refused without ``--resume``; with
  ``--resume`` its saved ``config.yaml`` must agree with the current config on every key that changes
  what is trained (the differing keys are named), and its last checkpoint's global batch must be kept;
- a directory that holds no run but files an earlier attempt left (a ``tokenizer/`` trained before a
  data error, a plan, metrics...) is cleaned, so nothing stale is reused: a rerun equals a clean start.
  ``--resume`` into such a directory, or an empty one, says that it starts fresh.

While writing (:func:`disk_full_guard`): a write that fails because the disk is full is reported as
"no space left on <path>", with what is still intact.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import yaml

from cltk import checkpoint, lock, registry
from cltk import distributed as dist
from cltk.config import RunConfig
from cltk.errors import UserError
from cltk.tracking import log

# What a run writes into its output directory (besides checkpoints/ and stages/*/stage.json, which mark a
# run; the methods' own files are their specs' run_files): removed when an attempt that finished nothing
# is started again. config.yaml and plan.json are
# rewritten by every run and may be a user's own files, so they stay; dot files (the fault-injection
# markers), anything else in the directory, and anything the config points at are left alone.
LEFTOVERS = (
    "tokenizer",
    "world.json",
    "metrics.csv",
    "tensorboard",
    "sequence_ids",
    "stages",
    "checkpoints",
    "forgetting.json",
    "forgetting.csv",
    "forgetting.png",
)
# Keys a resumed run may change: they do not change what is trained or measured. The global batch
# (micro batch x accumulation x world size) is checked on its own, so these may trade off.
RESUMABLE_KEYS = frozenset(
    {
        "name",
        "output_dir",
        "data.cache_dir",
        "train.micro_batch_size",
        "train.gradient_accumulation_steps",
        "train.train_batch_size",
        "train.checkpoint_every",
        "train.keep_checkpoints",
        "train.log_every",
        "train.log_sequence_ids",
        "eval.batch_size",
        "eval.heatmap",
    }
)


class RunDirError(UserError):
    """The output directory cannot be used as it is; the message names the path and the fix."""


def holds_run(out: Path) -> bool:
    """True when ``out`` holds a checkpoint or a finished stage (a run to resume, never to overwrite)."""
    return (out / "checkpoints" / "latest").is_file() or any((out / "stages").glob("*/stage.json"))


def _writable_dir(path: Path, key: str) -> None:
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{key}: {path} is a file, not a directory; choose a directory path")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(
            f"{key}: cannot create {path} ({e.strerror or e}); choose a place you can write"
        ) from e
    probe = path / f".cltk-write-test-{uuid.uuid4().hex[:8]}"
    try:
        with open(probe, "w") as f:
            f.write("ok")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise RunDirError(
            f"{key}: cannot write in {path} ({e.strerror or e}); choose a place you can write"
        ) from e
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def check_writable_dir(path: Path, key: str) -> None:
    """``path`` is (or can be made) a directory cltk can write; raises :class:`RunDirError` naming
    ``key`` (for ``cltk prepare``'s cache, ``cltk eval --out``...)."""
    _writable_dir(path, key)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train.lr": ..., "domains[0].name": ...}``: one entry per leaf value."""
    if isinstance(d, dict) and (prefix == "" or d):
        flat: dict[str, Any] = {}
        for k, v in d.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    if isinstance(d, list) and d and all(isinstance(v, dict) for v in d):
        flat = {f"{prefix} (count)": len(d)}
        for i, v in enumerate(d):
            flat.update(_flatten(v, f"{prefix}[{i}]"))
        return flat
    return {prefix: d}


def _parents(key: str) -> list[str]:
    parts = key.replace("[", ".[").split(".")
    return [".".join(parts[:i]).replace(".[", "[") for i in range(len(parts) - 1, 0, -1)]


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> now`` for every key (outside :data:`RESUMABLE_KEYS`) whose value differs.

    A section set on one side only (``das: null`` -> ``das: {...}``) is one difference; a key that one
    side does not know at all (a key added by a later cltk) is not.
    """
    a, b = _flatten(saved), _flatten(current)
    out: list[str] = []
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_KEYS:
            continue
        if key in a and key in b:
            if a[key] != b[key]:
                out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
            continue
        side = a if key not in a else b
        parent = next((k for k in _parents(key) if k in side), None)
        if parent is None or parent in RESUMABLE_KEYS:
            continue
        was = a[parent] if side is a else "(section)"
        now = b[parent] if side is b else "(section)"
        line = f"{parent}: {was!r} -> {now!r}".replace("'(section)'", "(section)")
        if line not in out:
            out.append(line)
    return out


def check_global_batch(tag: str, state: dict[str, Any], cfg: RunConfig, world_size: int) -> None:
    """Refuse to resume checkpoint ``tag`` with another global batch (it would move the data position)."""
    now = cfg.global_batch(world_size)
    if state.get("global_batch") != now:
        raise RunDirError(
            f"checkpoint {tag} was written with a global batch of {state.get('global_batch')} "
            f"sequences (world size {state.get('world_size')}); resuming with {now} would change "
            "the data position and LR schedule. Keep micro_batch_size x gradient_accumulation_steps x "
            "world size the same (e.g. scale train.gradient_accumulation_steps when the world size "
            "changes)"
        )


def _check_resume(cfg: RunConfig, out: Path) -> None:
    saved_path = out / "config.yaml"
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text()) or {}
        now = cfg.to_dict()
        grows = len(now.get("domains") or []) > len(saved.get("domains") or [])
        # a run that grows (domains appended): cltk.grow.check_config says what may change then
        diffs = [] if grows else config_differences(saved, now)
        if diffs:
            raise RunDirError(
                f"--resume: the config differs from the run in {out} ({saved_path.name}) in "
                f"{len(diffs)} key(s) that change what is trained: " + "; ".join(diffs) + ". "
                "Resume with the run's config, or start a new run in another output_dir"
            )
    root = out / "checkpoints"
    try:
        tag = checkpoint.latest_tag(root)
    except RuntimeError as e:
        raise RunDirError(
            f"--resume: {e}; remove {root / checkpoint.LATEST} to resume from "
            "the finished stages only"
        ) from e
    if tag is not None:
        check_global_batch(tag, checkpoint.read_state(root, tag), cfg, dist.world_size())


def _referenced_paths(cfg: RunConfig) -> list[Path]:
    """Every path the config points at (a tokenizer, a model, corpora...): never removed as a leftover."""
    m = cfg.model
    raw = [cfg.tokenizer.path, m.init_from, m.gguf, cfg.deepspeed, cfg.data.cache_dir]
    for d in cfg.domains + registry.extra_sources(cfg):
        for key, value in d.source.items():
            if key in ("builtin", "field", "split"):
                continue
            for v in value if isinstance(value, list) else [value]:
                if isinstance(v, str):
                    raw.append(v.split("*")[0].split("?")[0].split("[")[0] or ".")
    return [cfg.resolve(r).resolve() for r in raw if r]  # type: ignore[union-attr]


def _clean_leftovers(cfg: RunConfig, out: Path) -> list[str]:
    # no cltk run ever started here: nothing of cltk's to remove
    if not (out / "world.json").is_file():
        return []
    referenced = _referenced_paths(cfg)
    removed = []
    for name in LEFTOVERS + tuple(f for spec in registry.specs() for f in spec.run_files):
        p = out / name
        if any(r == p.resolve() or p.resolve() in r.parents for r in referenced):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(name)
    return removed


def _take_lock(out: Path) -> None:
    """Rank 0 takes the output directory's lock (:mod:`cltk.lock`); a refusal is raised on every rank."""
    refused = None
    if dist.is_main():
        try:
            lock.acquire(out)
        except lock.RunLockedError as e:
            refused = str(e)
    refused = dist.broadcast_object(refused)
    if refused:
        raise lock.RunLockedError(refused)


class RunExistsError(UserError):
    """Starting afresh would overwrite an existing run's checkpoints."""


def check_run_dir(cfg: RunConfig, resume: bool) -> None:
    """Everything about the output directory that must hold before any work (see the module docstring).

    Call on every rank after the process group is up: each rank checks, rank 0 alone cleans.
    """

    out = cfg.out
    _writable_dir(out, "output_dir")
    _writable_dir(cfg.cache_dir, "data.cache_dir")
    _take_lock(out)
    if holds_run(out):
        if not resume:
            raise RunExistsError(
                f"{out} already holds a run (checkpoints or finished stages); pass --resume to "
                "continue it, or choose another output_dir. Nothing was changed"
            )
        _check_resume(cfg, out)
        return
    dist.barrier()  # every rank has looked before rank 0 changes anything
    if dist.is_main():
        removed = _clean_leftovers(cfg, out)
        if resume:
            log(f"--resume: {out} holds no checkpoint and no finished stage: starting fresh")
        if removed:
            log(
                f"{out} held files of an earlier attempt that finished no stage; removed them so "
                f"nothing stale is reused: {', '.join(removed)}"
            )
    dist.barrier()
