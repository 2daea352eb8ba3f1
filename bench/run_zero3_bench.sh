#!/usr/bin/env bash
# The DeepSpeed ZeRO-3 benchmark run of 2026-11-28 on 2 H200s (plus the FSDP2 resample re-measure),
# exactly as sent to the device machine (nvidia-h200-x2, which has no deepspeed: wheels carried in .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit; set -o pipefail; bash bench/run_zero3_bench.sh $OUT 2>&1 | tee $OUT/log.txt
# .whl held deepspeed 0.19.8 (pip wheel --no-deps), hjson 3.1.0, pydantic 2.14.4, pydantic-core 2.50.5,
# annotated-types 0.8.0, typing-inspection 0.4.5, typing-extensions 4.16.0 (cp312 manylinux).
# Each mode runs in its own process under `timeout`, cut to what is left of BUDGET seconds, and merges
# into OUTDIR/zero3.json (--append); a per-phase watchdog inside the script saves and exits on a hang.
# CPU smoke check of this script (no GPU):
#   DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 BENCH_ARGS="--device cpu --tiny" bash bench/run_zero3_bench.sh /tmp/z3
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-bench/results/raw}
BUDGET=${BUDGET:-515}
source bench/zero3_run_lib.sh
run 170 rosa_zero3 $Z --modes rosa_zero3
run 110 peft_lora_zero3 $Z --modes peft_lora_zero3
run 120 fsdp2_resample $TR bench/fsdp2_bench.py --modes rosa --methods eigh --out "$OUTDIR/fsdp2-resample-2gpu-v2.json" $BENCH_ARGS
run 200 rosa_zero3_offload $Z --modes rosa_zero3_offload
echo "== all done after $(( SECONDS - start )) s, status $status"
exit $status
