#!/usr/bin/env bash
# cltk on one machine: NPROC ranks through the deepspeed launcher. CPU ranks talk over gloo
# (a laptop, CI), GPU ranks over NCCL (one GPU node); cltk picks the backend itself.
#
# Use:
#   launch/local.sh NPROC --config RUN.yaml [--resume] [--set key=value ...]
#   launch/local.sh 2 --config examples/tiny.yaml                   # laptop: 2 CPU ranks
#   launch/local.sh 8 --config run.yaml --set train.lr=1e-4         # one 8-GPU node
#   CLTK_CMD=tests/scripts/dist_probe.py launch/local.sh 2 --out /tmp/probe   # what the tests run
#
# Variables:
#   CLTK_CMD         what the launcher starts (default "--module cltk train"; split on spaces)
#   MASTER_PORT      rendezvous port (default 29500): give concurrent runs on one machine their own
#   OMP_NUM_THREADS  threads per rank (default cores / NPROC: CPU ranks must not fight over cores)
#   CUDA_VISIBLE_DEVICES  when set, the first NPROC of these GPUs are used (deepspeed --num_gpus
#                    alone would ignore it and take GPUs 0..NPROC-1)
set -euo pipefail

nproc_per_node=${1:?usage: launch/local.sh NPROC [cltk train args...]}
shift
read -r -a cmd <<<"${CLTK_CMD:---module cltk train}"

if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
  IFS=, read -r -a gpus <<<"$CUDA_VISIBLE_DEVICES"
  resources=(--include "localhost:$(IFS=,; echo "${gpus[*]:0:nproc_per_node}")")
else
  resources=(--num_gpus "$nproc_per_node")
fi

cores=$(nproc)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cores / nproc_per_node > 0 ? cores / nproc_per_node : 1 ))}

exec deepspeed "${resources[@]}" --master_port "${MASTER_PORT:-29500}" "${cmd[@]}" "$@"
