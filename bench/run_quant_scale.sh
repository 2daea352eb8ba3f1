#!/usr/bin/env bash
# One GPU call: a Llama-3-70B shape over NF4 built layer by layer (train steps + one full resample),
# then the Llama-3-8B shape with the chunked loss (ROSA vs PEFT QLoRA, ROSA over bf16, AdamW8bit).
# Expects bitsandbytes' wheel in .carry/bnb/ (the GPU machines lack it); JSON and logs go to $OUT.
#   OUT=/tmp/qs BUDGET=240 bash bench/run_quant_scale.sh
set -u
OUT=${OUT:-/tmp/quant-scale}
BUDGET=${BUDGET:-240}  # seconds the 70B eigh resample may take before qr is used instead
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --target /tmp/site-packages .carry/bnb/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site-packages PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python3 bench/quant_bench.py --shape 70b --chunked-loss --init-method qr --resample-budget-s "$BUDGET" \
    --mode-timeout 480 --out "$OUT/quant-70b.json" 2>&1 | tee "$OUT/quant-70b.log"
python3 bench/quant_bench.py --chunked-loss --init-method qr --skip-resample --mode-timeout 100 \
    --modes rosa_nf4 qlora_nf4 rosa_bf16 rosa_nf4_adamw8bit --out "$OUT/quant-8b.json" 2>&1 | tee "$OUT/quant-8b.log"
