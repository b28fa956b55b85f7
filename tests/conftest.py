import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
# DeepSpeed JIT-compiles its CPU ops (shm all-reduce, CPU Adam) into TORCH_EXTENSIONS_DIR under a file lock.
# A build killed mid-way leaves the lock behind and every later launch waits on it forever, so the tests
# build into the checkout's own directory rather than a cache shared with other runs on the machine.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".torch_extensions")
)
