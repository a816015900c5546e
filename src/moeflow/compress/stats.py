"""Per-tensor statistics that predict how well a tensor compresses.

- exponent histogram and its Shannon entropy ``H_exp``;
- ideal bits per value when only the exponent is entropy-coded: ``bits - exp_bits + H_exp``
  (bf16: ``8 + H_exp``, so the ratio bound is ``16 / (8 + H_exp)``, as in DFloat11 and ZipNN);
- coverage ``p`` of the best 7-exponent window ``[b+1, b+7]`` and the TBE cost it implies,
  ``11 p + 19 (1 - p) = 19 - 8p`` bits for bf16 (ZipServ's TBE cost).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moeflow._deps import require
from moeflow.compress.bits import DTypeSpec, float_spec, readonly, tensor_to_bits

nb = require("numba", "moeflow.compress")

WINDOW = 7  # codes 1..7 address exponents b+1..b+7; code 0 is the fallback


@dataclass(frozen=True)
class TensorStats:
    dtype: str
    numel: int
    exp_hist: np.ndarray  # counts per exponent value, length 2**exp_bits
    exp_entropy: float  # H_exp in bits
    distinct_exponents: int
    ideal_bits: float  # bits per value with an ideal exponent coder
    ideal_ratio: float  # value bits / ideal_bits
    window_base: int  # b: the window is [b+1, b+7]
    window_coverage: float  # fraction of values whose exponent is in the window
    tbe_bits: float  # bits per value of the TBE format, before padding


@nb.njit(nogil=True, cache=True)
def _exp_hist(vals, shift, mask, nbins):
    h = np.zeros((4, nbins), np.int64)
    n = vals.shape[0]
    m = n // 4 * 4
    for i in range(0, m, 4):
        h[0, (vals[i] >> shift) & mask] += 1
        h[1, (vals[i + 1] >> shift) & mask] += 1
        h[2, (vals[i + 2] >> shift) & mask] += 1
        h[3, (vals[i + 3] >> shift) & mask] += 1
    for i in range(m, n):
        h[0, (vals[i] >> shift) & mask] += 1
    return h[0] + h[1] + h[2] + h[3]


def exponent_histogram(bits: np.ndarray, spec: DTypeSpec) -> np.ndarray:
    """Counts of each exponent field value of flat raw bits."""
    vals = readonly(np.ascontiguousarray(bits).reshape(-1))
    return _exp_hist(vals, spec.man_bits, (1 << spec.exp_bits) - 1, 1 << spec.exp_bits)


def entropy_bits(hist: np.ndarray) -> float:
    """Shannon entropy ``-sum p log2 p`` of a histogram."""
    n = hist.sum()
    if n == 0:
        return 0.0
    p = hist[hist > 0] / n
    return float(-(p * np.log2(p)).sum())


def best_window(hist: np.ndarray, width: int = WINDOW) -> tuple[int, int]:
    """Base ``b`` maximizing the count of exponents in ``[b+1, b+width]``, and that count.

    ``b`` ranges over ``[-1, len(hist) - 1 - width]`` so the window can include exponent 0
    (zeros, subnormals) and the top exponent (inf/NaN).
    """
    csum = np.concatenate([[0], np.cumsum(hist)])
    # window starting at exponent s = b + 1 covers csum[s + width] - csum[s]
    cover = csum[width:] - csum[:-width]
    s = int(np.argmax(cover))
    return s - 1, int(cover[s])


def stats_from_bits(bits: np.ndarray, dtype: str) -> TensorStats:
    spec = float_spec(dtype)
    hist = exponent_histogram(bits, spec)
    n = int(hist.sum())
    h = entropy_bits(hist)
    base, covered = best_window(hist)
    p = covered / n if n else 0.0
    ideal = spec.bits - spec.exp_bits + h
    # TBE: 3 code bits + the stored non-exponent bits (bf16: 8; fp16: 3 planes + 8) when
    # covered; fallback adds the full value.
    tbe = 3 + (spec.bits - spec.exp_bits) + (1 - p) * spec.bits
    return TensorStats(
        dtype=dtype,
        numel=n,
        exp_hist=hist,
        exp_entropy=h,
        distinct_exponents=int((hist > 0).sum()),
        ideal_bits=ideal,
        ideal_ratio=spec.bits / ideal if n else 1.0,
        window_base=base,
        window_coverage=p,
        tbe_bits=tbe,
    )


def tensor_stats(t) -> TensorStats:
    """Statistics of a torch tensor (bf16, fp16 or fp32)."""
    bits, dtype, _ = tensor_to_bits(t)
    return stats_from_bits(bits, dtype)
