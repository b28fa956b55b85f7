"""Rank helpers that also work in a single process (no process group: rank 0 of 1).

cltk reads the usual launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) that the
``deepspeed`` launcher, torchrun and cltk's SLURM scripts set, and initialises the process group through
DeepSpeed: gloo on CPU, NCCL on CUDA.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import torch
import torch.distributed as dist

from cltk.extensions import check_build_locks


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if is_initialized():
        # NCCL's barrier guesses the rank's GPU from the rank number unless it is told (a wrong guess
        # hangs or warns on multi-GPU nodes)
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank())
    return torch.device("cpu")


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def bf16_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def free_port() -> int:
    """A TCP port free on this host now (for a launcher's --master_port or MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(timeout_minutes: float | None = None) -> None:
    """Initialise the process group once (a single process gets a group of one, so DeepSpeed runs).

    The timeout bounds how long a rank waits for a dead peer (default ``$DEEPSPEED_TIMEOUT`` minutes or 30):
    a killed rank makes the others fail, not hang.
    """
    if is_initialized():
        return
    import deepspeed

    quiet_libraries()

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    minutes = timeout_minutes or float(os.environ.get("DEEPSPEED_TIMEOUT", "30"))
    # DeepSpeed JIT-builds ops from here on (the CPU shm all-reduce at once): a lock left by a killed
    # build would hang this launch forever
    check_build_locks()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    deepspeed.init_distributed(
        dist_backend=backend(), timeout=datetime.timedelta(minutes=minutes), verbose=False
    )
    _forget_deepspeed_groups()
    release_shm_names()


def _forget_deepspeed_groups() -> None:
    """A new process group makes DeepSpeed's cached clones of an earlier one stale: a second run in one
    Python process (``cltk.train`` twice, a notebook) would otherwise hand ``deepspeed.initialize`` a
    destroyed group ("Group ... is not registered"). DeepSpeed keeps them as module globals (0.19.8)."""
    from deepspeed.utils import groups

    for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP"):
        if hasattr(groups, name):
            setattr(groups, name, None)


def release_shm_names() -> None:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer name once every rank has mapped every buffer.

    DeepSpeed's shm all-reduce (CPU) creates a named shared-memory buffer per rank
    (``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>``, tens of MB) and never unlinks
    it, so every run, and always a killed one, leaves it behind until /dev/shm fills the machine's memory.
    Each rank maps all buffers during ``init_distributed``; after a barrier the names are no longer needed,
    and the memory is freed when the last rank exits, however it exits. Collective: call it on every rank
    right after the first ``deepspeed.init_distributed`` / ``deepspeed.initialize`` of a process
    (:func:`init` does; scripts that set up DeepSpeed themselves call it too).
    """
    if torch.cuda.is_available():
        return
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{rank()}"
    )
    barrier()
    try:
        os.unlink(name)
    except FileNotFoundError:  # no shm op (another accelerator or DeepSpeed version): nothing to do
        pass


def quiet_libraries() -> None:
    """Keep the console to cltk's own lines: library progress bars off, DeepSpeed's INFO lines off."""
    import logging
    import warnings

    import datasets
    import transformers
    from deepspeed.utils import logger as ds_logger

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    ds_logger.setLevel(logging.WARNING)
    # DeepSpeed's ZeRO calls a torch collective that torch marks deprecated, once per step
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)


def comm_device() -> torch.device:
    """The device the process group's backend reduces on: the rank's GPU under NCCL, the CPU under gloo.

    NCCL serves CUDA tensors only ("No backend type associated with device type cpu"), even in a group of
    one, and gloo here serves CPU tensors, so every collective in cltk puts its tensor on this device.
    """
    name = dist.get_backend() if is_initialized() else backend()
    if name == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks, in place, and return it; ``t`` may live on any device.

    The collective runs whenever a process group exists, at any world size (a group of one included), so
    that a single-GPU run exercises the same NCCL path as a multi-GPU one; without a group it is a no-op.
    The tensor goes to :func:`comm_device` for the reduction and the result is copied back.
    """
    if not is_initialized():
        return t
    dev = comm_device()
    work = t if t.device == dev and t.is_contiguous() else t.to(dev).contiguous()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not t:
        t.copy_(work)
    return t


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """``[n, ...]`` on each rank -> ``[world * n, ...]`` (rank 0's rows first) on ``x``'s device.

    Every rank passes the same shape. Not differentiable (see :mod:`cltk.methods.das.contrastive` for that).
    """
    if not is_initialized():
        return x
    dev = comm_device()
    work = x.to(dev).contiguous()
    parts = [torch.empty_like(work) for _ in range(world_size())]
    dist.all_gather(parts, work)
    return torch.cat(parts).to(x.device)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
