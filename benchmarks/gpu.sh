#!/usr/bin/env bash
# Everything cltk claims for GPUs, one command on one GPU, one page (see benchmarks/gpu.py):
#   bash benchmarks/gpu.sh [--page docs/benchmarks/gpu.md]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python
exec "$PY" benchmarks/gpu.py "$@"
