#!/usr/bin/env bash
# Issue #4 on ONE H200: how much of ZeRO-3's gap to FSDP2 remains without any communication?
# With one process every all-gather is a local copy, so what is left of the gap is DeepSpeed's per-module
# hook work and its fetch/release bookkeeping. Same model and figures as the 2-GPU runs; FSDP2 measured in
# the same call for the ratio. On nvidia-h200, carrying the DeepSpeed wheels in .whl/:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit; set -o pipefail; bash bench/run_zero3_1gpu.sh $OUT 2>&1 | tee $OUT/log.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-bench/results/raw}
BUDGET=${BUDGET:-420}
NPROC=1 PREFIX=1gpu-
source bench/zero3_run_lib.sh
run 120 fsdp2 $TR bench/fsdp2_bench.py --modes peft_lora,rosa --methods "" --out "$OUTDIR/zero3-1gpu-fsdp2.json" $BENCH_ARGS
one rosa-leaf 105 --modes rosa_zero3 --leaf-modules LlamaDecoderLayer
one lora-leaf 105 --modes peft_lora_zero3 --leaf-modules LlamaDecoderLayer
one rosa 105 --modes rosa_zero3
exit $status
