import os
from pathlib import Path

import pytest

from tests.kit.distributed import _two_rank_session, on_two_ranks  # noqa: F401 - fixtures

os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed JIT-compiles its CPU ops (shm all-reduce, CPU Adam) into TORCH_EXTENSIONS_DIR under a file lock.
# A build killed mid-way leaves the lock behind and every later launch waits on it forever, so the tests
# build into the checkout's own directory rather than a cache shared with other runs on the machine.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions")
)

SHM = Path("/dev/shm")
_SHM_BEFORE = pytest.StashKey[set]()


def _deepspeed_shm_buffers() -> set[str]:
    return {f.name for f in SHM.glob("deepspeed_allreduce_buffer_*")} if SHM.is_dir() else set()


def pytest_sessionstart(session):
    session.config.stash[_SHM_BEFORE] = _deepspeed_shm_buffers()


def pytest_sessionfinish(session, exitstatus):
    """Every run the suite starts must leave /dev/shm as it found it: DeepSpeed's CPU all-reduce buffers
    (tens of MB each) that outlive their launch fail the session, and are removed."""
    before = session.config.stash.get(_SHM_BEFORE, set())
    left = sorted(_deepspeed_shm_buffers() - before)
    if not left:
        return
    for name in left:
        (SHM / name).unlink(missing_ok=True)
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    message = (
        f"FAILED: the test session left {len(left)} DeepSpeed shm buffer(s) in /dev/shm (now removed): "
        + ", ".join(left)
    )
    if reporter is not None:
        reporter.ensure_newline()
        reporter.write_line(message, red=True)
    session.exitstatus = 1


@pytest.fixture(scope="module")
def process_group():
    """A process group of one for in-process runs that get past the config (the environment restored
    and the group destroyed afterwards)."""
    from cltk.distributed import free_port

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield
    import torch.distributed as td

    if td.is_initialized():
        td.destroy_process_group()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
