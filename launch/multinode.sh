#!/usr/bin/env bash
# One node of a multi-node rosa-train job, through `accelerate launch`. Run it on every node.
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 launch/multinode.sh --config run.yaml
# Variables: NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT (required); GPUS_PER_NODE (default: all
# GPUs here; on CPU-only nodes CPU_PROCS_PER_NODE processes, default 1); ENGINE=fsdp2 (default) | zero3 | ddp. Arguments after
# the variables go to rosa-train. Timeouts, signals and NCCL settings: launch/env.sh. SIGTERM, SIGUSR1
# or a Ctrl-C: every process saves a checkpoint and stops; exit status 75.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
source "$here/env.sh"
die() { echo "multinode.sh: error: $*" >&2; exit 2; }
for var in NNODES NODE_RANK MASTER_ADDR MASTER_PORT; do
  [ -n "${!var:-}" ] || die "$var is not set (need NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT)"
done
[ "$NODE_RANK" -lt "$NNODES" ] || die "NODE_RANK=$NODE_RANK must be below NNODES=$NNODES"
ENGINE=${ENGINE:-fsdp2}
gpus=$(rosa_gpus_per_node)
per_node=$(( gpus > 0 ? gpus : ${CPU_PROCS_PER_NODE:-1} ))  # CPU-only nodes: CPU_PROCS_PER_NODE processes
engine_args=()
case "$ENGINE:$gpus" in
  # rosa-train shards the model itself (FSDP2): each rank reads only its shards from the folder, so
  # no GPU or host ever holds the whole model (accelerate's FSDP plugin would load it whole on each GPU)
  fsdp2:*) engine_args=(--multi_gpu); set -- "$@" --fsdp true ;;
  zero3:0) die "ENGINE=zero3 needs GPUs" ;;
  zero3:*) engine_args=(--config_file "$here/../configs/accelerate/zero3.yaml"  # each node starts its own
                        --deepspeed_multinode_launcher standard) ;;  # processes (not pdsh/ssh from node 0)
  ddp:*) engine_args=(--multi_gpu) ;;
  *) die "ENGINE must be fsdp2, zero3 or ddp, not '$ENGINE'" ;;
esac
rosa_launch --agent multinode.sh "node $NODE_RANK of $NNODES" \
  "$PYTHON" -m accelerate.commands.launch "${engine_args[@]}" \
  --num_machines "$NNODES" --machine_rank "$NODE_RANK" --num_processes $(( NNODES * per_node )) \
  --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
  --rdzv_backend c10d --rdzv_conf "join_timeout=$ROSA_JOIN_TIMEOUT" --max_restarts 0 \
  -m rosa_scale.train "$@"
