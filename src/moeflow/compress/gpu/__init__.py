"""Triton kernels for ZipServ's TBE format: one decode kernel and one fused decompress-GEMM.

- ``TBEMatrix`` holds TBE weights on a device (``TBEMatrix.from_tensor(w, device)`` encodes
  with the CPU codec; ``tbe_encode_torch(w)`` encodes with torch ops on ``w``'s device).
- ``tbe_decode(m)``: the dense tensor, bit-exact (one program per 64x64 block).
- ``tbe_linear(x, m)``: ``x @ W^T`` for skinny ``x`` (1-``MAX_TOKENS`` tokens) without
  materialising W (ZipServ's ZipGEMM idea: weights are decoded into registers for ``tl.dot``).

Both were the faster of two kernels measured on an H200 (benchmarks/gpu/compress_gpu.py).
``moeflow.compress.gpu.experimental_unit`` holds an unmeasured candidate; nothing here imports
it. Needs the ``triton`` extra; kernels run on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from moeflow._deps import require

require("triton", "moeflow.compress.gpu")

from moeflow.compress.gpu.decode import tbe_decode  # noqa: E402
from moeflow.compress.gpu.linear import tbe_linear  # noqa: E402
from moeflow.compress.gpu.matrix import (  # noqa: E402
    MAX_TOKENS,
    TBEMatrix,
    skinny_input,
    tbe_encode_torch,
)

__all__ = [
    "MAX_TOKENS",
    "TBEMatrix",
    "skinny_input",
    "tbe_decode",
    "tbe_encode_torch",
    "tbe_linear",
]
