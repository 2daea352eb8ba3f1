#!/usr/bin/env bash
# Issue #4 follow-up on 2 H200s, in calls of under 10 minutes:
#   a: is ROSA >= 2x PEFT LoRA when both fetch decoder layers whole, and how much of the gap to FSDP2
#      is the re-gathering of persisted params (persistence threshold)?
#   b: on one GPU ZeRO-3 with leaf layers reaches 0.91x FSDP2 (bench/results/zero3-2026-11-29-1gpu.md),
#      so the rest of the 2-GPU gap is communication: does fetching further ahead (prefetch bucket,
#      live parameters), or DeepSpeed's fast fetch of leaf modules, close it?
# On nvidia-h200-x2, carrying the DeepSpeed wheels in .whl/ (see the previous run scripts):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD || exit; set -o pipefail; bash bench/run_zero3_tuning.sh $OUT a 2>&1 | tee $OUT/log.txt
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-bench/results/raw}
BUDGET=${BUDGET:-540}
source bench/zero3_run_lib.sh
# rosa-train's ZeRO-3 default since part b (named leaves on DeepSpeed's fast fetch; prefetch 1e9 from zero3.json),
# and the default before it (named leaves, prefetch 5e8)
FAST="--leaf-modules LlamaDecoderLayer --ds-set stage3_module_granularity_threshold=1"
OLD="--leaf-modules LlamaDecoderLayer --ds-set stage3_prefetch_bucket_size=5e8"
case "${2:-a}" in
  a)
    one lora-leaf 130 --modes peft_lora_zero3 --leaf-modules LlamaDecoderLayer
    one rosa-leaf-p1e5 130 --modes rosa_zero3 --leaf-modules LlamaDecoderLayer --persistence-threshold 1e5
    one rosa-leaf-p1e6 130 --modes rosa_zero3 --leaf-modules LlamaDecoderLayer --persistence-threshold 1e6
    one lora-leaf-p1e5 130 --modes peft_lora_zero3 --leaf-modules LlamaDecoderLayer --persistence-threshold 1e5 ;;
  b)
    one rosa-leaf-prefetch2e9 130 --modes rosa_zero3 --leaf-modules LlamaDecoderLayer \
      --ds-set stage3_prefetch_bucket_size=2e9 --ds-set stage3_max_live_parameters=4e9
    one rosa-leaf-prefetch1e9 130 --modes rosa_zero3 --leaf-modules LlamaDecoderLayer --ds-set stage3_prefetch_bucket_size=1e9
    # DeepSpeed's own leaf choice: granularity = params / modules below; a ROSA decoder layer is ~1.1e7,
    # its parts less, and modules over 1e9 params never qualify: 2e7 picks the layers, with its fast leaf fetch
    # (on --tiny, GRANULARITY=1e4 does; 2e7 makes the whole model one leaf there, which DeepSpeed cannot train)
    one rosa-granularity 130 --modes rosa_zero3 --ds-set stage3_module_granularity_threshold=${GRANULARITY:-2e7}
    one rosa-leaf 130 --modes rosa_zero3 --leaf-modules LlamaDecoderLayer  # the same call's reference
    run 120 fsdp2 $TR bench/fsdp2_bench.py --modes rosa --methods "" --out "$OUTDIR/zero3-tuning-fsdp2.json" $BENCH_ARGS ;;
  c)
    # b found DeepSpeed's own leaf choice (granularity 2e7) 1.13x faster than the same layers named as leaves:
    # any threshold > 0 also turns on its fast fetch of leaf modules. A threshold of 1 picks no module itself, so
    # rosa-train now names the leaves and sets it to 1; configs/deepspeed/zero3.json prefetches 1e9 (was 5e8).
    # The new default against the old one, in one call:
    one rosa-leaf-fast 130 --modes rosa_zero3 $FAST
    one rosa-leaf-old 130 --modes rosa_zero3 $OLD
    run 120 fsdp2 $TR bench/fsdp2_bench.py --modes rosa --methods "" --out "$OUTDIR/zero3-tuning-fsdp2.json" $BENCH_ARGS
    one rosa-leaf-fast-prefetch2e9 130 --modes rosa_zero3 $FAST \
      --ds-set stage3_prefetch_bucket_size=2e9 --ds-set stage3_max_live_parameters=4e9
    one lora-leaf-fast 130 --modes peft_lora_zero3 $FAST
    one rosa-offload-leaf-fast 200 --modes rosa_zero3_offload $FAST ;;
  ab)
    # c's first two runs, interleaved REPEATS times (default 3) for a machine whose step times drift
    # (one lent H200 ranged 0.39-0.71 s within a run): NPROC=1 PREFIX=1gpu- BENCH_ARGS="--steps 30" on one GPU.
    for i in $(seq 1 "${REPEATS:-3}"); do
      one "rosa-leaf-fast-$i" 110 --modes rosa_zero3 $FAST
      one "rosa-leaf-old-$i" 110 --modes rosa_zero3 $OLD
    done ;;
  gc)
    # ab left ZeRO-3's steps ranging 0.38-0.66 s on one H200 while FSDP2's stayed within 0.35-0.39 s: is it
    # Python's garbage collector pausing inside DeepSpeed's hooks? The new default with and without it, interleaved.
    for i in $(seq 1 "${REPEATS:-2}"); do
      one "rosa-leaf-fast-gc10-$i" 110 --modes rosa_zero3 $FAST --gc-every 10
      one "rosa-leaf-fast-$i" 110 --modes rosa_zero3 $FAST
    done ;;
  *) echo "usage: $0 OUTDIR a|b|c|ab|gc" >&2; exit 2 ;;
esac
exit $status
