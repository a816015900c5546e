"""Lossless tensor compression: ZipServ's TBE format, Huffman-coded exponents, checkpoints.

``compress(t, codec="entropy" | "tbe" | "raw" | "auto")`` returns a self-describing blob and
``decompress(blob)`` restores the tensor bit for bit (or raises ``CorruptDataError``).
GPU kernels (Triton) live in ``moeflow.compress.triton_tbe``; the checkpoint CLI in
``moeflow.compress.cli``.
"""

from moeflow.compress.container import CODECS, CompressedTensor, compress, decompress
from moeflow.compress.stats import TensorStats, best_window, entropy_bits, tensor_stats

__all__ = ["CODECS", "CompressedTensor", "TensorStats", "best_window", "compress", "decompress",
           "entropy_bits", "tensor_stats"]
