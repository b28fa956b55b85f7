#!/usr/bin/env bash
# cltk across the nodes of a hostfile (MPI style, one "HOST slots=N" line per node, N = ranks on
# that node). For SLURM clusters use launch/slurm_multi.sbatch instead.
#
# Use, either way with the same cltk install and paths on every node:
#   a) no ssh between nodes (containers, k8s, any scheduler): run on EVERY node, with its rank
#        NODE_RANK=0 MASTER_ADDR=node0 launch/multinode.sh hostfile --config RUN.yaml   # on node0
#        NODE_RANK=1 MASTER_ADDR=node0 launch/multinode.sh hostfile --config RUN.yaml   # on node1
#   b) passwordless ssh (+ pdsh) to every host: run ONCE, on the first host of the hostfile
#        launch/multinode.sh hostfile --config RUN.yaml
#      deepspeed starts the ranks on all hosts through pdsh, forwarding only variables named
#      NCCL*, PYTHON*, UCX*, MV2*, MLFLOW*: put others (DEEPSPEED_TIMEOUT, TORCH_EXTENSIONS_DIR,
#      HF_HOME...) in ~/.deepspeed_env or ./.deepspeed_env, one VAR=value a line.
#
# Variables:
#   NODE_RANK    this node's index in the hostfile (0 = first line); selects mode a)
#   MASTER_ADDR  address of the hostfile's first node (mode a: required; mode b: that host)
#   MASTER_PORT  rendezvous port on MASTER_ADDR (default 29500)
#   CLTK_CMD     what the launcher starts (default "--module cltk train"; split on spaces)
#   LAUNCHER     mode b only: deepspeed's --launcher (pdsh by default; openmpi, mvapich, ...)
# NCCL_SOCKET_IFNAME / NCCL_IB_HCA choose the network (see docs/launching.md).
set -euo pipefail

hostfile=${1:?usage: launch/multinode.sh HOSTFILE [cltk train args...]}
shift
[[ -f "$hostfile" ]] || { echo "launch/multinode.sh: no hostfile $hostfile" >&2; exit 2; }
read -r -a cmd <<<"${CLTK_CMD:---module cltk train}"
first_host=$(awk '!/^[[:space:]]*(#|$)/ {print $1; exit}' "$hostfile")
port=${MASTER_PORT:-29500}

if [[ -n "${NODE_RANK:-}" ]]; then
  # Each node's launcher starts only its own slots; all meet at MASTER_ADDR.
  exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$NODE_RANK" \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR to the first node of $hostfile}" \
    --master_port "$port" "${cmd[@]}" "$@"
fi
exec deepspeed --hostfile "$hostfile" --launcher "${LAUNCHER:-pdsh}" \
  --master_addr "${MASTER_ADDR:-$first_host}" --master_port "$port" "${cmd[@]}" "$@"
