#!/usr/bin/env bash
# The FSDP2 benchmark runs of 2026-11-28 on H200s, exactly as sent to the device machine:
#   nvidia-h200:    set -o pipefail; PYTHONUNBUFFERED=1 bash bench/run_fsdp2_bench.sh 1 $OUT 2>&1 | tee $OUT/log.txt
#   nvidia-h200-x2: set -o pipefail; PYTHONUNBUFFERED=1 bash bench/run_fsdp2_bench.sh 2 $OUT 2>&1 | tee $OUT/log.txt
# With 1 GPU it first makes a 4-layer quick check, then the full 32-layer Llama-3-8B-shaped run.
# CPU smoke check (no GPU): OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/fsdp2_bench.py \
#   --device cpu --tiny --out /tmp/fsdp2-cpu.json
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:?usage: run_fsdp2_bench.sh GPUS [OUTDIR]}
OUTDIR=${2:-bench/results/raw}
mkdir -p "$OUTDIR"
source bench/device_env.sh
device_report
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "gpus", torch.cuda.device_count())'
status=0
if [ "$N" = 1 ]; then
  timeout 120 python3 -m torch.distributed.run --standalone --nproc_per_node 1 bench/fsdp2_bench.py \
    --layers 4 --out "$OUTDIR/fsdp2-4layers-1gpu.json" || { echo "4-layer quick check failed: rc=$?"; status=1; }
  LIMIT=450
else
  LIMIT=540
fi
timeout $LIMIT python3 -m torch.distributed.run --standalone --nproc_per_node "$N" bench/fsdp2_bench.py \
  --layers 32 --out "$OUTDIR/fsdp2-${N}gpu.json" || { echo "32-layer run failed: rc=$?"; status=1; }
exit $status
