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
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$OUTDIR"
# NVLink multicast stays off on the shared hosts (KINDS.md); OMP threads per rank kept modest.
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-8} NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
  NVSHMEM_DISABLE_NVLS=1 PYTHONWARNINGS=ignore::FutureWarning
start=$SECONDS
status=0
left() { echo $(( BUDGET - (SECONDS - start) )); }
run() {  # CAP NAME COMMAND...: run COMMAND under a timeout of min(CAP, time left - 5 s)
  local cap=$1 name=$2; shift 2
  local t=$(( $(left) - 5 ))
  (( t > cap )) && t=$cap
  if (( t < 30 )); then echo "== skip $name: only ${t} s left"; status=1; return; fi
  echo "== $name: timeout ${t} s ($(left) s of the budget left)"
  timeout -k 10 "$t" "$@"
  local rc=$?
  (( rc != 0 )) && { echo "== $name failed: rc=$rc"; status=1; }
  echo "== $name done after $(( SECONDS - start )) s"
}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c 'import torch, transformers, peft, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "deepspeed", deepspeed.__version__, "gpus", torch.cuda.device_count())' 2>&1 | grep -v Warning
TR="python3 -m torch.distributed.run --standalone --nproc_per_node 2"
Z="$TR bench/zero3_bench.py --append --watchdog 150 --out $OUTDIR/zero3.json $BENCH_ARGS"
# Follow-up after the engine change (owners factorize concurrently; fp32 masters; offload buffers):
run 150 rosa_zero3 $Z --modes rosa_zero3 --methods eigh,qr
run 110 rosa_zero3_leaf $TR bench/zero3_bench.py --append --watchdog 100 --out $OUTDIR/zero3-leaf.json \
  --modes rosa_zero3 --methods "" --leaf-modules LlamaDecoderLayer $BENCH_ARGS
run 100 fsdp2_resample $TR bench/fsdp2_bench.py --modes rosa --methods eigh --out "$OUTDIR/fsdp2-resample-2gpu-v3.json" $BENCH_ARGS
run 150 rosa_zero3_offload $Z --modes rosa_zero3_offload --methods qr
exit $status
