#!/usr/bin/env bash
# The peers' virtual environment for benchmarks/peers_ep.py: DeepSpeed-MoE, Tutel and
# torchtitan beside an editable moeflow, on CPU. Kept apart from moeflow's own environment:
# the peers are never moeflow dependencies.
#
#   benchmarks/peers/setup_env.sh [VENV]            # default VENV: .venv-peers (git-ignored)
#   TUTEL_SRC=/path/to/tutel benchmarks/peers/setup_env.sh   # a local Tutel checkout (or an
#                                                             export of TUTEL_REF without .git)
#
# * torch is pinned (the CPU wheel on a CPU-only machine; never an unpinned torch).
# * DeepSpeed with DS_BUILD_OPS=0: no ops built at install; the CPU accelerator JIT-builds
#   its small shared-memory op on first use.
# * torchtitan imports triton unconditionally, so triton is installed too (not used on CPU).
# * Tutel is not on the package index: built from source (TUTEL_SRC, else a clone of
#   TUTEL_REPO at TUTEL_REF) with NO_CUDA=1 and --no-build-isolation, which compiles its
#   C++ extension (tutel_custom_kernel: the CPU dispatch/combine kernels it needs) against
#   the pinned torch.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.venv-peers}
TORCH=${TORCH_VERSION:-2.13.0}
TRITON=${TRITON_VERSION:-3.9.0}
TUTEL_REPO=${TUTEL_REPO:-https://github.com/microsoft/tutel}
TUTEL_REF=${TUTEL_REF:-82af7aad9fc3ec981395ba97e7242a480984a55e}

python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q setuptools wheel   # --no-build-isolation builds with these
DS_BUILD_OPS=0 pip install -q "torch==$TORCH" deepspeed "torchtitan==0.3.0" "triton==$TRITON"
pip install -q -e .
src=${TUTEL_SRC:-}
if [ -z "$src" ]; then
  src=$(mktemp -d)/tutel
  git clone -q "$TUTEL_REPO" "$src"
  git -C "$src" checkout -q "$TUTEL_REF"
fi
NO_CUDA=1 pip install -q --no-build-isolation "$src"
# which Tutel source was built (peers_ep.py puts it in the record's versions)
git -C "$src" rev-parse HEAD 2>/dev/null > "$VENV/tutel-source.txt" || echo "$TUTEL_REF" > "$VENV/tutel-source.txt"
python - <<'PY'
import importlib.metadata as md
import torch
import tutel_custom_kernel  # noqa: F401  (the C++ extension must load after torch)
for name in ("torch", "deepspeed", "torchtitan", "tutel", "moeflow"):
    print(f"{name} {md.version(name)}")
PY
