# Shared by the ZeRO-3 run scripts (sourced): environment, a time budget, and `run CAP NAME CMD...`
# which runs one benchmark under min(CAP, what is left of BUDGET) seconds, and `one NAME CAP ARGS...`, one
# zero3_bench.py run with its own JSON. Expects OUTDIR, BUDGET; NPROC (default 2) is the number of
# processes (GPUs) per run, PREFIX (default empty) starts the JSON names after "zero3-".
set -uo pipefail
BENCH_ARGS=${BENCH_ARGS:-}
mkdir -p "$OUTDIR"
source bench/device_env.sh
export PYTHONWARNINGS=ignore::FutureWarning
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
device_report
python3 -c 'import torch, transformers, peft, deepspeed; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "deepspeed", deepspeed.__version__, "gpus", torch.cuda.device_count())' 2>&1 | grep -v Warning
TR="python3 -m torch.distributed.run --standalone --nproc_per_node ${NPROC:-2}"
Z="$TR bench/zero3_bench.py --append --watchdog 150 --out $OUTDIR/zero3.json $BENCH_ARGS"
one() {  # NAME CAP ARGS...: one zero3_bench.py process, its JSON $OUTDIR/zero3-$PREFIX$NAME.json
  local name=$1 cap=$2; shift 2
  run "$cap" "$name" $TR bench/zero3_bench.py --watchdog $(( cap - 20 )) --out "$OUTDIR/zero3-${PREFIX:-}$name.json" \
    --methods "" $BENCH_ARGS "$@"
}
