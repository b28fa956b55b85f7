"""Disk cost of a finished run's checkpoints and exports, in bytes per parameter.

    python benchmarks/checkpoint_size.py OUTPUT_DIR

Prints the parameter count (from the first stage export), the size of the last checkpoint (every rank's
files) and of one export, each per parameter: what ``train.keep_checkpoints`` multiplies.
"""

from __future__ import annotations

import sys
from pathlib import Path


def tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main(out: Path) -> None:
    from safetensors import safe_open

    export = min(p for p in (out / "stages").iterdir() if (p / "model.safetensors").is_file())
    with safe_open(str(export / "model.safetensors"), "pt") as f:
        params = sum(_numel(f, k) for k in f.keys())
    tag = (out / "checkpoints" / "latest").read_text().strip()
    ckpt = tree_bytes(out / "checkpoints" / tag)
    weights = (export / "model.safetensors").stat().st_size
    print(f"parameters {params:,}")
    print(f"checkpoint {tag}: {ckpt:,} bytes = {ckpt / params:.1f} bytes/parameter")
    print(
        f"export {export.name}/model.safetensors: {weights:,} bytes = {weights / params:.1f} bytes/parameter"
    )


def _numel(f, key: str) -> int:
    n = 1
    for d in f.get_slice(key).get_shape():
        n *= d
    return n


if __name__ == "__main__":
    main(Path(sys.argv[1]))
