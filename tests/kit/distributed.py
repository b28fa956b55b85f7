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

import multiprocessing as mp
import os
import queue
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from tests.multirank import remove_shm_buffers


def _rank_main(fn: Callable, args: tuple, rank: int, world_size: int, port: int, results) -> None:
    """One rank: the launcher's variables, DeepSpeed's gloo group (cltk's own init), ``fn(*args)``;
    puts ``(rank, True, value)`` or ``(rank, False, traceback)`` on ``results``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1")
    try:
        import torch

        torch.set_num_threads(1)
        from cltk import distributed as dist

        dist.init()  # deepspeed.init_distributed (gloo on CPU), then frees the shm buffer names
        results.put((rank, True, fn(*args)))
        dist.barrier()
    except BaseException:  # noqa: BLE001 - every failure goes to the parent, with its traceback
        results.put((rank, False, traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()


def run_distributed(fn: Callable, *args: Any, world_size: int = 2, timeout: float = 600) -> list:
    """``fn(*args)`` on ``world_size`` spawned ranks in one gloo group; returns every rank's value.

    ``fn`` and ``args`` must pickle (``fn`` at module level). The first rank to fail (or to die
    without a word) fails the call with its traceback, and the other ranks, perhaps waiting on it in
    a collective, are killed; so are all at ``timeout`` seconds. DeepSpeed's /dev/shm buffers of the
    launch are removed whatever happens. A port taken between its choice and the bind is retried.
    """
    for attempt in range(3):
        try:
            return _launch(fn, args, world_size, timeout)
        except AssertionError as e:
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
    for p in procs:
        p.start()
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(values) < world_size:
            try:
                rank, ok, value = results.get(timeout=1)
            except queue.Empty:
                _check_alive(fn, procs, values, deadline, timeout)
                continue
            if not ok:
                raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            values[rank] = value
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
        remove_shm_buffers(port)
    return [values[r] for r in range(world_size)]


def _check_alive(fn: Callable, procs: list, values: dict, deadline: float, timeout: float) -> None:
    # a rank that exited 0 has put its result (flushed before its exit): it is on its way
    dead = [p for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
    if dead:
        raise AssertionError(f"{fn.__name__}: {dead[0].name} died (exit {dead[0].exitcode}) "
                             "without a result")
    if time.monotonic() > deadline:
        raise AssertionError(f"{fn.__name__}: no result from every rank in {timeout:.0f} s")


def _run_all(checks: list[Callable]) -> dict[str, Any]:
    """Every check in turn on this rank (one launch for all); their values by name."""
    return {_name(fn): fn() for fn in checks}


def _name(fn: Callable) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


@pytest.fixture(scope="session")
def _two_rank_session(request) -> dict[str, Any]:
    """Rank 0's values of every check marked ``on_two_ranks`` among the session's tests, all run in
    one 2-rank launch (the first test that needs one starts it)."""
    checks: dict[str, Callable] = {}
    for item in request.session.items:
        mark = item.get_closest_marker("on_two_ranks")
        if mark is not None:
            fn = _check(item, mark)
            checks.setdefault(_name(fn), fn)
    return run_distributed(_run_all, list(checks.values()), timeout=1800)[0]


def _check(item, mark) -> Callable:
    (name,) = mark.args
    return getattr(item.module, name)


@pytest.fixture
def on_two_ranks(request, _two_rank_session) -> Any:
    """Rank 0's return of the check this test is marked with (``@pytest.mark.on_two_ranks("fn")``,
    ``fn`` a function of the test's module that takes no argument)."""
    mark = request.node.get_closest_marker("on_two_ranks")
    assert mark is not None, 'mark the test @pytest.mark.on_two_ranks("fn")'
    return _two_rank_session[_name(_check(request.node, mark))]
