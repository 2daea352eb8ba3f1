#!/usr/bin/env bash
# Issue #4 follow-up on 2 H200s: is ROSA >= 2x PEFT LoRA when both fetch decoder layers whole, and
# how much of the gap to FSDP2 is the re-gathering of persisted params (persistence threshold)?
# On nvidia-h200-x2, carrying the DeepSpeed wheels in .whl/ (see the previous run scripts):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit; set -o pipefail; bash bench/run_zero3_tuning.sh $OUT 2>&1 | tee $OUT/log.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-bench/results/raw}
BUDGET=${BUDGET:-540}
source bench/zero3_run_lib.sh
one() {  # NAME CAP ARGS...: one zero3_bench.py process, its own JSON
  local name=$1 cap=$2; shift 2
  run "$cap" "$name" $TR bench/zero3_bench.py --watchdog $(( cap - 20 )) --out "$OUTDIR/zero3-$name.json" --methods "" \
    $BENCH_ARGS "$@"
}
one lora-leaf 130 --modes peft_lora_zero3 --leaf-modules LlamaDecoderLayer
one rosa-leaf-p1e5 130 --modes rosa_zero3 --leaf-modules LlamaDecoderLayer --persistence-threshold 1e5
one rosa-leaf-p1e6 130 --modes rosa_zero3 --leaf-modules LlamaDecoderLayer --persistence-threshold 1e6
one lora-leaf-p1e5 130 --modes peft_lora_zero3 --leaf-modules LlamaDecoderLayer --persistence-threshold 1e5
exit $status
