"""numba kernels of the collective codec (``moeflow.compress.collective``).

The message body is the entropy codec's chunked payload (``moeflow.compress.entropy``:
DFloat11 / ZipNN split, Huffman-coded exponent symbols, four interleaved streams per 256 KiB
chunk, raw sign/mantissa bytes), so the entropy codec's fast decoder reads it. What differs
is where the code comes from: the entropy codec builds one from each chunk's histogram; here
each chunk takes the message's static table (ZipCCL) and keeps the lengths of the symbols it
contains. Pass 1 below is therefore a histogram for presence and stream sizes only, with no
Huffman construction; pass 2 is the entropy codec's writer.
"""

from __future__ import annotations

import numpy as np

from moeflow._deps import require
from moeflow.compress.entropy import (
    CHUNK_OVERHEAD,
    MAX_LEN,
    chunk_histogram,
    exponents_of,
    huffman_lengths,
)
from moeflow.compress.parallel import take

nb = require("numba", "moeflow.compress")


@nb.njit(nogil=True, cache=True)
def sample_stats(vals, kind, step):
    """Statistics of every ``step``-th value's exponent field: (sampled, zero-field count,
    normal count, sum and sum of squares of the unbiased exponents ``floor(log2|x|)`` of
    the normal values). Integer work only, and robust to outliers (unlike an RMS)."""
    if kind == 1:
        eb, mb = 8, 7
    elif kind == 2:
        eb, mb = 5, 10
    else:
        eb, mb = 8, 23
    bias = (1 << (eb - 1)) - 1
    emax = (1 << eb) - 1
    n = vals.shape[0]
    cnt = 0
    zeros = 0
    fin = 0
    s1 = 0
    s2 = 0
    for i in range(0, n, step):
        e = np.int64((np.uint64(vals[i]) >> np.uint64(mb)) & np.uint64(emax))
        cnt += 1
        if e == 0:
            zeros += 1
        elif e != emax:
            fin += 1
            u = e - bias
            s1 += u
            s2 += u * u
    return cnt, zeros, fin, np.float64(s1), np.float64(s2)


@nb.njit(nogil=True, cache=True)
def sample_symbols(vals, kind, step):
    """Histogram of the symbols (the entropy codec's: exponent byte, fp16 high byte) of every
    ``step``-th value: what a candidate table would spend on the sample."""
    h = np.zeros(256, np.int64)
    if kind == 1:
        for i in range(0, vals.shape[0], step):
            h[(np.uint32(vals[i]) >> np.uint32(7)) & np.uint32(0xFF)] += 1
    elif kind == 2:
        for i in range(0, vals.shape[0], step):
            h[np.uint32(vals[i]) >> np.uint32(8)] += 1
    else:
        for i in range(0, vals.shape[0], step):
            h[(np.uint32(vals[i]) >> np.uint32(23)) & np.uint32(0xFF)] += 1
    return h


@nb.njit(nogil=True, cache=True)
def plan_static(
    vals,
    counter,
    n_chunks,
    chunk_values,
    kind,
    itemsize,
    static_len,
    model_w,
    lengths,
    sbytes,
    sizes,
):
    """Pass 1 with static codes (``static_len[c]``: chunk c's table; ``model_w[c]`` its
    model weights): per chunk, the lengths of the symbols present (the others
    get none, so the chunk's code tables stay small), the byte length of each of its four
    streams and its total size (``sbytes[c, 0] = -1``: stored raw, as in the entropy codec,
    when coding would not save bytes).

    Escape: a chunk holding a symbol the static code has no code for (an exponent far from
    the message's scale) gets a code built from the same model weights ``model_w``
    restricted to the symbols it holds; the model gives every symbol a weight, so this code
    covers them all. Chunks without one (nearly all) use the static code as it is."""
    n_total = vals.shape[0]
    raw_w = 3 if kind == 3 else 1
    syms = np.empty(chunk_values, np.uint8)
    hq = np.zeros((4, 256), np.int64)
    w = np.zeros(256, np.int64)
    while True:
        c = take(counter)
        if c >= n_chunks:
            break
        a = c * chunk_values
        n = min(chunk_values, n_total - a)
        lengths[c, :] = 0
        exponents_of(vals, a, n, kind, syms)
        q = (n + 3) // 4
        escape = False
        for j in range(4):
            lo_j = min(n, j * q)
            hi_j = min(n, (j + 1) * q)
            hq[j] = chunk_histogram(syms[lo_j:hi_j], hi_j - lo_j)
        for s in range(256):
            present = hq[0, s] + hq[1, s] + hq[2, s] + hq[3, s] > 0
            w[s] = model_w[c, s] if present else 0
            if present:
                lengths[c, s] = static_len[c, s]
                if static_len[c, s] == 0:
                    escape = True
        if escape:
            lengths[c, :] = huffman_lengths(w, MAX_LEN)
        bits = 0
        lo = 255
        hi = 0
        for j in range(4):
            bj = 0
            for s in range(256):
                if hq[j, s]:
                    bj += hq[j, s] * lengths[c, s]
                    lo = min(lo, s)
                    hi = max(hi, s)
            sbytes[c, j] = (bj + 7) // 8
            bits += bj
        if n == 0 or CHUNK_OVERHEAD + n * raw_w + (bits + 7) // 8 >= n * itemsize:
            sbytes[c, 0] = -1
            lengths[c, :] = 0
            sizes[c] = 1 + n * itemsize
        else:
            sizes[c] = (
                3
                + (hi - lo + 2) // 2
                + 16
                + n * raw_w
                + sbytes[c, 0]
                + sbytes[c, 1]
                + sbytes[c, 2]
                + sbytes[c, 3]
                + 32
            )
