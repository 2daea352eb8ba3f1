#!/usr/bin/env bash
# rosa-train through plain torchrun (no accelerate config): DDP, or FSDP2 with `--fsdp true`.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 launch/torchrun.sh --config run.yaml --fsdp true
# Variables: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500),
# NPROC_PER_NODE (GPUs here, else 1). Timeouts, signals and NCCL settings: launch/env.sh. SIGTERM,
# SIGUSR1 or a Ctrl-C: every process saves a checkpoint and stops; exit status 75.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
gpus=$(rosa_gpus_per_node)
nproc=${NPROC_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
NNODES=${NNODES:-1}
rosa_launch --agent torchrun.sh "node ${NODE_RANK:-0} of $NNODES" \
  "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$nproc" \
  --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}" \
  --rdzv_conf "join_timeout=$ROSA_JOIN_TIMEOUT" --max_restarts 0 \
  -m rosa_scale.train "$@"
