#!/usr/bin/env bash
# rosa-train on this machine: all its GPUs (or NPROC CPU processes when it has none).
#   launch/local.sh --config configs/train/llama3-8b-fsdp2-2gpu.yaml
# Variables: ENGINE=fsdp2 (default) | zero3 | ddp; NPROC (default: number of GPUs, else 1);
# MASTER_PORT (default 29500). Arguments go to rosa-train. Timeouts and NCCL settings: env.sh.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
gpus=$(rosa_gpus_per_node)
NPROC=${NPROC:-$(( gpus > 0 ? gpus : 1 ))}
if [ "$NPROC" -le 1 ]; then
  rosa_launch local.sh rosa-train "$PYTHON" -m rosa_scale.train "$@"
  exit
fi
if [ "$gpus" -gt 0 ]; then export GPUS_PER_NODE=$NPROC; else export GPUS_PER_NODE=0 CPU_PROCS_PER_NODE=$NPROC; fi
trap - USR1  # a shell started with a signal ignored cannot trap it: multinode.sh must pass SIGUSR1 on
NNODES=1 NODE_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=${MASTER_PORT:-29500} exec "$here/multinode.sh" "$@"
