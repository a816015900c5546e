"""Lossless tensor compression: ZipServ's TBE format, Huffman-coded exponents, checkpoints.

``compress(t, codec="entropy" | "tbe" | "raw" | "auto")`` returns a self-describing blob and
``decompress(blob)`` restores the tensor bit for bit (or raises ``CorruptDataError``).
GPU kernels (Triton) live in ``moeflow.compress.gpu``; the checkpoint format and its
validated readers in ``moeflow.compress.checkpoint``, its CLI in ``moeflow.cli.compress``.
Modules: ``container`` (the blob) -> codecs ``entropy`` / ``tbe`` / raw -> ``checksum``;
``bits`` (dtype tables, raw-bit views, the shape rule), ``parallel`` (worker threads) and
``stats`` under them. Names load lazily, so the GPU kernels import without numba (an
extra: ``pip install "moeflow[compress]"``).
"""

from __future__ import annotations

import importlib

_LAZY = {
    "CODECS": "moeflow.compress.container",
    "CompressedTensor": "moeflow.compress.container",
    "compress": "moeflow.compress.container",
    "decompress": "moeflow.compress.container",
    "TensorStats": "moeflow.compress.stats",
    "best_window": "moeflow.compress.stats",
    "entropy_bits": "moeflow.compress.stats",
    "tensor_stats": "moeflow.compress.stats",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'moeflow.compress' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = list(_LAZY)
