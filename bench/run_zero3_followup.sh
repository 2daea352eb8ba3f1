#!/usr/bin/env bash
# Follow-up ZeRO-3 run of 2026-11-28 on 2 H200s after the engine change (owners factorize
# concurrently, merge from the fp32 masters, comm buffers on the GPU under CPU offload), plus ZeRO-3
# leaf modules and the FSDP2 resample memory after the eigh change. Sent as:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit; set -o pipefail; bash bench/run_zero3_followup.sh $OUT 2>&1 | tee $OUT/log.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-bench/results/raw}
BUDGET=${BUDGET:-430}
source bench/zero3_run_lib.sh
run 150 rosa_zero3 $Z --modes rosa_zero3 --methods eigh,qr
run 110 rosa_zero3_leaf $TR bench/zero3_bench.py --append --watchdog 100 --out $OUTDIR/zero3-leaf.json \
  --modes rosa_zero3 --methods "" --leaf-modules LlamaDecoderLayer $BENCH_ARGS
run 100 fsdp2_resample $TR bench/fsdp2_bench.py --modes rosa --methods eigh --out "$OUTDIR/fsdp2-resample-2gpu-v3.json" $BENCH_ARGS
run 150 rosa_zero3_offload $Z --modes rosa_zero3_offload --methods qr
exit $status
