#!/usr/bin/env bash
# One node of N GPUs against two "nodes" of N/2 (launch/multinode.sh) on one machine: GPUS=4 (default) on
# nvidia-h200-x4, GPUS=2 on nvidia-h200-x2 (two "nodes" of one GPU).
# Here, once: the wheels rosa-train needs there (datasets is missing on the device, ~54 MB):
#   .venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .carry/datasets-wheels datasets pyarrow dill multiprocess xxhash
# On the device, carrying .carry/datasets-wheels (about 7 minutes: a 16 GB model is built first):
#   bash bench/run_multinode_bench.sh $OUT
# CPU check: OMP_NUM_THREADS=1 python bench/multinode_bench.py --tiny --work /tmp/mnb --out /tmp/mnb.json --seq 32 --steps 12 --skip 2
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:?usage: run_multinode_bench.sh OUTDIR}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .carry/datasets-wheels/*.whl
export PYTHONPATH=/tmp/site:$PWD
source bench/device_env.sh
device_report
df -h /tmp | tail -1
python3 bench/multinode_bench.py --gpus "${GPUS:-4}" --out "$OUTDIR/multinode-${GPUS:-4}gpu.json" --work /tmp/rosa-multinode-bench --timeout 240 \
  2>&1 | grep --line-buffered -v "it/s\]\|Warning\|warnings.warn" | tail -60
