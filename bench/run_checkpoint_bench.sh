#!/usr/bin/env bash
# Checkpoint save / resume / consolidation of the Llama-3-8B shape on N GPUs (issue: measured on 2 H200s).
# On the device machine (nvidia-h200-x2; no extra wheels needed):
#   set -o pipefail; bash bench/run_checkpoint_bench.sh 2 $OUT 2>&1 | tee $OUT/log.txt
# With one GPU (nvidia-h200), `... 1 $OUT` times a one-writer checkpoint: consolidation is CPU work
# that reads every shard whatever their number, so its seconds and peak host GiB carry over; the
# two-writer save and resume times do not.
# CPU smoke check: OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/checkpoint_bench.py --device cpu --tiny \
#   --out /tmp/ckb.json --dir /tmp/ckb
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: run_checkpoint_bench.sh GPUS [OUTDIR]}
OUTDIR=${2:-bench/results/raw}
mkdir -p "$OUTDIR"
source bench/device_env.sh
df -h /tmp | tail -1
timeout 540 python3 -m torch.distributed.run --standalone --nproc_per_node "$N" bench/checkpoint_bench.py \
  --layers 32 --out "$OUTDIR/checkpoint-${N}gpu.json" --dir /tmp/rosa-ckpt-bench
