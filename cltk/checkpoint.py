"""Atomic DeepSpeed checkpoints for full resume: engine, optimizer, scheduler, data position and RNG.

A checkpoint is written under a temporary tag, completed on every rank, then renamed into place by rank 0
and only then named in ``latest`` (itself replaced atomically): a crash mid-write leaves the previous good
checkpoint and ``latest`` untouched. The output directory must be on a file system every rank sees (as
DeepSpeed's own checkpoints assume on multi-node runs).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cltk import distributed as dist
from cltk.diskfull import disk_full_guard
from cltk.errors import UserError

STATE_FILE = "cltk_state.json"
LATEST = "latest"


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(root: Path) -> str | None:
    """The tag of the last complete checkpoint under ``root``, or None."""
    p = Path(root) / LATEST
    if not p.is_file():
        return None
    tag = p.read_text().strip()
    if not (Path(root) / tag / STATE_FILE).is_file():
        raise RuntimeError(
            f"{p} names checkpoint {tag!r}, which is missing or incomplete under {root}"
        )
    return tag


def read_state(root: Path, tag: str) -> dict[str, Any]:
    return json.loads((Path(root) / tag / STATE_FILE).read_text())


def rank_tensors_file(directory: Path, rank: int | None = None) -> Path:
    """Where rank ``rank`` (default: this one) keeps the methods' tensor state in a checkpoint or stage."""
    return Path(directory) / f"methods_rank{dist.rank() if rank is None else rank}.pt"


def save_rank_tensors(directory: Path, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """This rank's method tensors ``{method: {name: tensor}}`` into ``directory`` (nothing when empty)."""
    tensors = {k: v for k, v in tensors.items() if v}
    if tensors:
        tmp = rank_tensors_file(directory).with_suffix(".tmp")
        torch.save({k: {n: t.detach().cpu() for n, t in v.items()} for k, v in tensors.items()}, tmp)
        os.replace(tmp, rank_tensors_file(directory))


def load_rank_tensors(directory: Path, world_size: int) -> dict[str, dict[str, torch.Tensor]]:
    """What :func:`save_rank_tensors` wrote for this rank; ``{}`` when no method kept tensors.

    Raises:
        UserError: the tensors were written by a run with another number of ranks (a method's tensors are
            laid out like that run's ZeRO partitions).
    """
    directory = Path(directory)
    saved = sorted(directory.glob("methods_rank*.pt"))
    if not saved:
        return {}
    if len(saved) != world_size or not rank_tensors_file(directory).is_file():
        raise UserError(
            f"{directory} holds method state of {len(saved)} rank(s), laid out like their ZeRO "
            f"partitions, and this run has {world_size}: resume it with {len(saved)} rank(s)"
        )
    return torch.load(rank_tensors_file(directory), map_location="cpu", weights_only=True)


def save(
    engine,
    root: Path,
    tag: str,
    state: dict[str, Any],
    keep: int,
    tensors: dict[str, dict[str, torch.Tensor]] | None = None,
) -> None:
    """Save a full checkpoint as ``root/tag`` (collective: every rank calls it).

    Args:
        state: JSON-able cltk state (stage, step, method state...), written last as the completion mark.
        keep: complete checkpoints kept; older ones are deleted after the new one is in place.
        tensors: this rank's method tensors ``{method: {name: tensor}}`` (see :func:`save_rank_tensors`).
    """
    root = Path(root)
    tmp_tag = f".tmp-{tag}"
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        if (root / tmp_tag).exists():
            shutil.rmtree(root / tmp_tag)  # leftover of a crash mid-write
    dist.barrier()
    with _disk_full_guard(root, tag):
        # universal_checkpoint_info: ds_to_universal can convert ZeRO 1/2 ones to another world size
        engine.save_checkpoint(
            str(root), tag=tmp_tag, client_state={"universal_checkpoint_info": {}}, save_latest=False
        )
        torch.save(rng_state(), root / tmp_tag / f"rng_rank{dist.rank()}.pt")
        save_rank_tensors(root / tmp_tag, tensors or {})
    dist.barrier()
    if dist.is_main():
        with _disk_full_guard(root, tag):
            write_atomic(root / tmp_tag / STATE_FILE, json.dumps(state, indent=1))
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.replace(root / tmp_tag, final)
        with _disk_full_guard(root, tag):
            write_atomic(root / LATEST, tag)
        _prune(root, keep)
    dist.barrier()


def _disk_full_guard(root: Path, tag: str):
    """A full disk mid-save is a :class:`~cltk.diskfull.DiskFullError` saying what is still intact."""
    return disk_full_guard(
        root,
        f"checkpoint {tag}",
        describe_latest(root)
        + f" (the partial {root / ('.tmp-' + tag)} is removed by the next save, or delete it)",
    )


def _prune(root: Path, keep: int) -> None:
    tags = sorted(
        (
            p
            for p in root.iterdir()
            if p.is_dir()
            and not p.name.startswith(".")
            and not p.name.endswith("-universal")
            and (p / STATE_FILE).is_file()
        ),
        key=lambda p: json.loads((p / STATE_FILE).read_text())["order"],
    )
    for p in tags[: max(0, len(tags) - max(1, keep))]:
        shutil.rmtree(p, ignore_errors=True)
        shutil.rmtree(root / universal_tag(p.name), ignore_errors=True)


def universal_tag(tag: str) -> str:
    return f"{tag}-universal"


def to_universal(root: Path, tag: str) -> str:
    """Convert checkpoint ``tag`` to DeepSpeed's universal format (once, on rank 0); returns its tag.

    A plain ZeRO checkpoint only loads at the world size that wrote it; the universal one loads at any
    (the engine must then be built with ``{"checkpoint": {"load_universal": true}}``).
    """
    root = Path(root)
    utag = universal_tag(tag)
    if dist.is_main() and not (root / utag / STATE_FILE).is_file():
        from argparse import Namespace

        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        tmp = root / f".tmp-{utag}"
        if tmp.exists():
            shutil.rmtree(tmp)
        ds_to_universal(
            Namespace(
                input_folder=str(root / tag),
                output_folder=str(tmp),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
        )
        shutil.copy(root / tag / STATE_FILE, tmp / STATE_FILE)
        final = root / utag
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    dist.barrier()
    return utag


def load(engine, root: Path, tag: str) -> dict[str, Any]:
    """Restore engine, optimizer and scheduler state and this rank's RNG; returns the cltk state."""
    load_path, _ = engine.load_checkpoint(
        str(root), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root}/{tag}")
    rng_file = Path(root) / tag / f"rng_rank{dist.rank()}.pt"
    if rng_file.is_file():  # absent when resuming at another world size
        set_rng_state(torch.load(rng_file, weights_only=False))
    return read_state(root, tag)


def describe_latest(root: Path) -> str:
    """What a resume would start from, for the messages above."""
    try:
        tag = latest_tag(root)
    except (RuntimeError, OSError):
        tag = None
    if tag is None:
        return "no earlier checkpoint exists; finished stages under stages/ are intact"
    return (
        f"the last good checkpoint {tag} is intact ({root / LATEST} names it): free "
        "space, then rerun with --resume"
    )
