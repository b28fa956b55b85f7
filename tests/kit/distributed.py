"""Run a function on real gloo ranks from inside a test (OLMo-core's ``run_distributed_test`` is the
model): no launcher, no script, real processes and DeepSpeed's own process group.

    def check(n):                       # module level: the ranks import it by name
        return dist.all_reduce_sum(torch.ones(n))
    results = run_distributed(check, 3)  # [rank 0's return, rank 1's]

and, to share one launch between several checks of a session (the launch costs more than most checks):

    @pytest.mark.on_two_ranks("check_a")  # a function of the test's module
    def test_a(on_two_ranks): ...         # on_two_ranks: rank 0's return of check_a()
"""

from __future__ import annotations

import inspect
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from tests.multirank import remove_shm_buffers


def _rank_main(fn: Callable, args: tuple, rank: int, world_size: int, port: int, results) -> None:
    """One rank: the launcher's variables, DeepSpeed's gloo group (cltk's own init), ``fn(*args)``;
    puts ``(rank, True, value)`` or ``(rank, False, traceback)`` on ``results`` (a generator's items
    each as ``(rank, None, item)`` as they come, then ``(rank, True, None)``)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    try:
        import torch

        torch.set_num_threads(1)
        from cltk import distributed as dist

        dist.init()  # deepspeed.init_distributed (gloo on CPU), then frees the shm buffer names
        value = fn(*args)
        if inspect.isgenerator(value):
            for item in value:
                results.put((rank, None, item))
            value = None
        results.put((rank, True, value))
        dist.barrier()
    except BaseException:  # noqa: BLE001 - every failure goes to the parent, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()


class RankFailure(AssertionError):
    """A rank failed, died or timed out; ``streamed[rank]`` holds what that rank yielded before."""

    def __init__(self, message: str, streamed: dict[int, list]):
        super().__init__(message)
        self.streamed = streamed


def run_distributed(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 600) -> list:
    """``fn(*args)`` on ``world_size`` spawned ranks in one gloo group; returns every rank's value
    (for a generator function, the list of what it yielded).

    ``fn`` and ``args`` must pickle (``fn`` at module level). The first rank to fail (or to die
    without a word) fails the call with its traceback, and the other ranks, perhaps waiting on it in
    a collective, are killed; so are all at ``timeout`` seconds. DeepSpeed's /dev/shm buffers of the
    launch are removed whatever happens. A port taken between its choice and the bind is retried.
    """
    for attempt in range(3):
        try:
            return _launch(fn, args, world_size, timeout)
        except RankFailure as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _launch(fn: Callable, args: tuple, world_size: int, timeout: float) -> list:
    from cltk.distributed import free_port

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(fn, args, r, world_size, port, results),
                         name=f"rank{r}") for r in range(world_size)]
    _start_resolved(ctx, procs)
    values: dict[int, Any] = {}
    streamed: dict[int, list] = {r: [] for r in range(world_size)}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=1)
            except queue.Empty:
                _check_alive(fn, procs, values, deadline, timeout, streamed)
                continue
            if ok is None:
                streamed[rank].append(value)
                continue
            if not ok:
                raise RankFailure(f"{fn.__name__} failed on rank {rank}:\n{value}", streamed)
            values[rank] = streamed[rank] if inspect.isgeneratorfunction(fn) else value
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        remove_shm_buffers(port)
    return [values[r] for r in range(world_size)]


def _start_resolved(ctx, procs: list) -> None:
    """Start the ranks with the virtual environment's paths resolved (a worktree's ``.venv`` may be a
    link), as the ``deepspeed`` launcher's ranks see them: DeepSpeed JIT-builds its CPU ops with the
    paths it was imported from, and a build made under other paths is rebuilt (a minute or more)."""
    saved = list(sys.path)
    ctx.set_executable(os.path.join(os.path.realpath(sys.prefix), "bin", "python3"))
    sys.path[:] = [os.path.realpath(p) if p else p for p in saved]  # what the ranks start with
    try:
        for p in procs:
            p.start()
    finally:
        sys.path[:] = saved


def _check_alive(fn: Callable, procs: list, values: dict, deadline: float, timeout: float,
                 streamed: dict[int, list]) -> None:
    # a rank that exited 0 has put its result (flushed before its exit): it is on its way
    dead = [p for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
    if dead:
        raise RankFailure(f"{fn.__name__}: {dead[0].name} died (exit {dead[0].exitcode}) "
                          "without a result", streamed)
    if time.monotonic() > deadline:
        raise RankFailure(f"{fn.__name__}: no result from every rank in {timeout:.0f} s", streamed)


def _run_all(checks: list[Callable]):
    """Every check in turn on this rank (one launch for all), yielding ``(name, value)`` each."""
    for fn in checks:
        yield _name(fn), fn()


def _name(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


@pytest.fixture(scope="session")
def _two_rank_session(request) -> dict[str, Any]:
    """Rank 0's values of every check marked ``on_two_ranks`` among the session's tests, all run in
    one 2-rank launch (the first test that needs one starts it). A check that fails (on any rank) is
    recorded as failed with that rank's traceback, and the checks after it run in a new launch."""
    checks: dict[str, Callable] = {}
    for item in request.session.items:
        mark = item.get_closest_marker("on_two_ranks")
        if mark is not None:
            fn = _check(item, mark)
            checks.setdefault(_name(fn), fn)
    values: dict[str, Any] = {}
    pending = list(checks.values())
    while pending:
        try:
            values.update(run_distributed(_run_all, pending, timeout=1800)[0])
            break
        except RankFailure as e:  # the first check some rank did not finish is the failed one
            done = min(len(items) for items in e.streamed.values())
            values.update(e.streamed[0][:done])
            if done == len(pending):  # every check finished: the launch failed after them
                raise
            values[_name(pending[done])] = _Failed(str(e))
            pending = pending[done + 1 :]
    return values


class _Failed(str):
    """A check's failure (its message) in place of its value."""


def _check(item, mark) -> Callable:
    (name,) = mark.args
    return getattr(item.module, name)


@pytest.fixture
def on_two_ranks(request, _two_rank_session) -> Any:
    """Rank 0's return of the check this test is marked with (``@pytest.mark.on_two_ranks("fn")``,
    ``fn`` a function of the test's module that takes no argument)."""
    mark = request.node.get_closest_marker("on_two_ranks")
    assert mark is not None, 'mark the test @pytest.mark.on_two_ranks("fn")'
    value = _two_rank_session[_name(_check(request.node, mark))]
    if isinstance(value, _Failed):
        pytest.fail(value, pytrace=False)
    return value
