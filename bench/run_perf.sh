#!/usr/bin/env bash
# The fsdp2_bench runs that perf_report.py reads for one GPU count, most important first, each skipped
# once the call's time budget could not hold it (a lent machine runs one call for 10 minutes at most).
#   bash bench/run_perf.sh GPUS OUTDIR NAME [PARTS]      e.g. on nvidia-h200-x2:
#   bash bench/run_perf.sh 2 $OUT perf-2026-12-02 "compiled peft-eager rosa-ckpt"
# writes OUTDIR/NAME-<GPUS>gpu-<part>.json; copy them to bench/results/, then
#   python3 bench/perf_report.py --prefix bench/results/NAME
# Parts: compiled (frozen, ROSA, ROSA without shared_inputs, PEFT LoRA, all compiled; + factors sharded on
# 2 GPUs), peft-eager (PEFT LoRA as its users run it), rosa-ckpt (checkpointing + loss chunks: the 8B
# peak), ckpt (the same for every mode), local and local-ckpt (rosa-train's one-process path, 1 GPU).
# BUDGET_S (default 560) bounds the call; PART_S (default 150) is what a part is assumed to need. Exit status:
# 0 all written, 1 a part wrote nothing, 2 an unknown part (nothing run), 3 a part skipped for time.
# CPU check: DEVICE=cpu bash bench/run_perf.sh 2 /tmp/perf smoke compiled
set -uo pipefail
cd "$(dirname "$0")/.."
GPUS=${1:?usage: run_perf.sh GPUS OUTDIR NAME [PARTS]}
OUTDIR=${2:?usage: run_perf.sh GPUS OUTDIR NAME [PARTS]}
NAME=${3:?usage: run_perf.sh GPUS OUTDIR NAME [PARTS]}
PARTS=${4:-compiled peft-eager rosa-ckpt}
BUDGET_S=${BUDGET_S:-560}
PART_S=${PART_S:-150}
mkdir -p "$OUTDIR"
source bench/device_env.sh
device_report
extra=()
if [ "${DEVICE:-cuda}" = cpu ]; then
  extra=(--device cpu --tiny)
  export OMP_NUM_THREADS=1
fi
modes="frozen,rosa,rosa_ungrouped,peft_lora"
if [ "$GPUS" -gt 1 ]; then modes="$modes,rosa_sharded"; fi
for part in $PARTS; do
  case $part in
    compiled | peft-eager | rosa-ckpt | ckpt | local | local-ckpt) ;;
    *) echo "run_perf.sh: unknown part '$part' (compiled, peft-eager, rosa-ckpt, ckpt, local, local-ckpt)" >&2
       exit 2 ;;
  esac
done
status=0
for part in $PARTS; do
  case $part in
    compiled) args=(--compile --modes "$modes") ;;
    peft-eager) args=(--modes peft_lora) ;;
    rosa-ckpt) args=(--compile --checkpointing --loss-chunk 1024 --modes rosa) ;;
    ckpt) args=(--compile --checkpointing --loss-chunk 1024 --modes frozen,rosa,rosa_ungrouped,peft_lora) ;;
    local) args=(--compile --modes frozen_local,rosa_local,rosa_local_ungrouped) ;;
    local-ckpt) args=(--compile --checkpointing --loss-chunk 1024 --modes frozen_local,rosa_local,rosa_local_ungrouped) ;;
  esac
  if [ $((SECONDS + PART_S)) -gt "$BUDGET_S" ]; then
    echo "run_perf.sh: $part skipped: ${SECONDS}s of ${BUDGET_S}s used"
    status=3
    continue
  fi
  out="$OUTDIR/$NAME-${GPUS}gpu-$part.json"
  rm -f "$out"
  start=$SECONDS
  torchrun --standalone --nproc_per_node "$GPUS" bench/fsdp2_bench.py --methods '' "${args[@]}" "${extra[@]}" \
    --out "$out" 2>&1 | grep --line-buffered -v "Warning\|warnings.warn" | tail -25
  [ -s "$out" ] || status=1
  echo "run_perf.sh: $part took $((SECONDS - start))s -> $out"
done
exit $status
