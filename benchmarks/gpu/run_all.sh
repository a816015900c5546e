#!/usr/bin/env bash
# One prepared GPU run (see README "GPU benchmarks"). Results go to $OUT (default ./out).
#   bash benchmarks/gpu/run_all.sh
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/gpu_info.txt" 2>&1
# Budgets add up to 7 minutes, inside one 8-minute device call (TBE kernels only; the MoE
# layer benchmark, benchmarks/gpu/layer_gpu.py, was measured on 2026-11-28 and is not rerun).
timeout 270 python3 benchmarks/gpu/tbe_unit_gpu.py --out "$OUT" --budget-s 200 \
  > "$OUT/tbe_unit_gpu.log" 2>&1
echo "tbe_unit_gpu rc=$?" >> "$OUT/gpu_info.txt"
timeout 150 python3 benchmarks/gpu/compress_gpu.py --out "$OUT" --budget-s 100 \
  > "$OUT/compress_gpu.log" 2>&1
echo "compress_gpu rc=$?" >> "$OUT/gpu_info.txt"
cat "$OUT/gpu_info.txt"; tail -n 60 "$OUT"/*.md
