#!/usr/bin/env bash
# One prepared GPU run (see benchmarks/README.md): every GPU benchmark, within about 9 minutes
# in all (one device call allows 10). Results (markdown, JSON, logs) go to $OUT (default ./out).
#   bash benchmarks/gpu/run_all.sh
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  > "$OUT/gpu_info.txt" 2>&1
# Each script stops starting new shapes at its --budget-s and is killed at its timeout; the
# timeouts add up to 460 s, plus 90 s for the ZipCCL codec kernels and 120 s for the NCCL
# serving test (seconds where it skips: it needs two GPUs). The experimental kernels come
# first: they have never been measured.
run() {  # run NAME TIMEOUT_S ARGS...: one script, its log and exit status
  local name=$1 limit=$2
  shift 2
  timeout "$limit" python3 "benchmarks/gpu/$name.py" --out "$OUT" "$@" > "$OUT/$name.log" 2>&1
  echo "$name rc=$?" >> "$OUT/gpu_info.txt"
}
run tbe_experimental_gpu 230 --budget-s 165
run compress_gpu 110 --budget-s 60
run layer_gpu 120
# ZipCCL's Triton collective codec: bit-exactness and GB/s (part "gpu" of the ZipCCL benchmark)
timeout 90 python3 benchmarks/zipccl_cpu.py gpu --tag "h200_$(date -u +%F)" --out "$OUT" \
  > "$OUT/zipccl_gpu.log" 2>&1
echo "zipccl_gpu rc=$?" >> "$OUT/gpu_info.txt"
# Disaggregated serving on NCCL ranks (one GPU per rank): needs two GPUs, reported as skipped
# on a one-GPU host
timeout 120 python3 -m pytest -q -p no:cacheprovider -rs tests/serving/test_disagg_nccl.py \
  > "$OUT/disagg_nccl.log" 2>&1
echo "disagg_nccl rc=$? ($(tail -n 1 "$OUT/disagg_nccl.log"))" >> "$OUT/gpu_info.txt"
cat "$OUT/gpu_info.txt"; tail -n 40 "$OUT"/*.md
