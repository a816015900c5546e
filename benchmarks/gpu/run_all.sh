#!/usr/bin/env bash
# One prepared GPU run (see README "GPU benchmarks"). Results go to $OUT (default ./out).
#   bash benchmarks/gpu/run_all.sh
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/gpu_info.txt" 2>&1
# Budgets add up to 9 minutes, inside one 10-minute device call; the TBE kernels go first.
timeout 200 python3 benchmarks/gpu/compress_gpu.py --out "$OUT" > "$OUT/compress_gpu.log" 2>&1
echo "compress_gpu rc=$?" >> "$OUT/gpu_info.txt"
timeout 150 python3 benchmarks/gpu/tbe_rowpop_gpu.py --out "$OUT" > "$OUT/tbe_rowpop_gpu.log" 2>&1
echo "tbe_rowpop_gpu rc=$?" >> "$OUT/gpu_info.txt"
timeout 180 python3 benchmarks/gpu/layer_gpu.py --out "$OUT" > "$OUT/layer_gpu.log" 2>&1
echo "layer_gpu rc=$?" >> "$OUT/gpu_info.txt"
tail -n 40 "$OUT"/*.md
