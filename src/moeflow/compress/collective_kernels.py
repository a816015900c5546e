"""numba kernels of the collective codec (``moeflow.compress.collective``).

A value is split as in the entropy codec (DFloat11 / ZipNN): the exponent goes through a
prefix code, the other bits are stored raw. What differs is the code: a static table chosen
per message (ZipCCL: the exponent distribution of near-Gaussian training tensors is
predicted by their scale), addressed by the exponent relative to a per-message ``base``:

- symbol ``d`` in ``[0, WINDOW)`` codes exponent ``base + d``;
- symbol ``ZERO`` codes exponent field 0 (zeros and subnormals; their mantissa is raw);
- symbol ``ESC`` is followed by the exponent field itself, so any bit pattern round-trips.

Per value the bit stream holds ``code [exponent if ESC] [extra]``, where ``extra`` is the
three high bits of an fp16 value that are not exponent (sign, m9, m8). Raw bytes: bf16
``sign<<7 | m[6:0]``; fp16 ``m[7:0]``; fp32 ``m[7:0], m[15:8], sign<<7 | m[22:16]``.
Blocks of ``BLOCK_VALUES`` values have independent streams, so threads encode and decode
blocks in any order (taken from a shared counter, ``parallel.run_shared``).
"""

from __future__ import annotations

import numpy as np

from moeflow._deps import require
from moeflow.compress._intrinsics import load_u64, store_u32
from moeflow.compress.parallel import take

nb = require("numba", "moeflow.compress")

WINDOW = 32          # relative exponents with their own code
ZERO = WINDOW        # exponent field 0
ESC = WINDOW + 1     # escape: the exponent field follows raw
NSYM = WINDOW + 2
MAX_LEN = 12         # longest code; decode table has 2**MAX_LEN entries
BLOCK_VALUES = 1 << 16

# kind: 1 bf16, 2 fp16, 3 fp32 -> (exponent bits, mantissa bits, raw bytes, extra bits)
KIND_LAYOUT = {1: (8, 7, 1, 0), 2: (5, 10, 1, 3), 3: (8, 23, 3, 0)}


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


def exponent_entries(base, lens, codes, exp_bits):
    """Per exponent field ``e``: its whole code ``code | length << 32`` under a table
    shifted to ``base`` (``ESC`` + the field for exponents without a code of their own), so
    the encoder does one lookup per value and no branches."""
    e = np.arange(1 << exp_bits, dtype=np.int64)
    d = e - base
    inwin = (d >= 0) & (d < WINDOW)
    sym = np.where(inwin, np.clip(d, 0, WINDOW - 1), ESC)
    sym = np.where(inwin & (lens[np.clip(d, 0, WINDOW - 1)] > 0), sym, ESC)
    sym[0] = ZERO
    ln = lens[sym].astype(np.uint64)
    code = codes[sym].astype(np.uint64)
    esc = sym == ESC
    code[esc] |= e[esc].astype(np.uint64) << ln[esc]
    ln[esc] += np.uint64(exp_bits)
    return code | (ln << np.uint64(32))


@nb.njit(inline="always")
def _exp_field(x, kind):
    if kind == 1:
        return (x >> np.uint32(7)) & np.uint32(0xFF)
    if kind == 2:
        return (x >> np.uint32(10)) & np.uint32(0x1F)
    return (x >> np.uint32(23)) & np.uint32(0xFF)


@nb.njit(nogil=True, cache=True)
def plan_blocks(vals, counter, n_blocks, kind, ent, out_bits):
    """Pass 1: exact bit count of every block's stream into ``out_bits``."""
    xb = 3 if kind == 2 else 0
    n = vals.shape[0]
    while True:
        b = take(counter)
        if b >= n_blocks:
            break
        a = b * BLOCK_VALUES
        z = min(n, a + BLOCK_VALUES)
        tot = np.uint64(0)
        for i in range(a, z):
            tot += ent[_exp_field(np.uint32(vals[i]), kind)] >> np.uint64(32)
        out_bits[b] = np.int64(tot) + xb * (z - a)


@nb.njit(nogil=True, cache=True)
def write_blocks(vals, counter, n_blocks, kind, ent, out, raw_off, stream_off, stream_bytes):
    """Pass 2: raw bytes in place at ``out[raw_off:]``; each block's stream is built in a
    scratch buffer and copied to ``out[stream_off[b]:]`` (a 4-byte flush at a block's end
    would otherwise overwrite the next block's first bytes, written by another thread).
    Returns 0, or -1 if a stream came out another size than planned."""
    n = vals.shape[0]
    scratch = np.zeros(BLOCK_VALUES * 4 + 16, np.uint8)
    m32 = np.uint64(0xFFFFFFFF)
    while True:
        b = take(counter)
        if b >= n_blocks:
            break
        a = b * BLOCK_VALUES
        z = min(n, a + BLOCK_VALUES)
        acc = np.uint64(0)
        nacc = np.uint64(0)
        pos = 0
        for i in range(a, z):
            x = np.uint32(vals[i])
            t = ent[_exp_field(x, kind)]
            c = t & m32
            ln = t >> np.uint64(32)
            if kind == 2:  # sign, m9, m8 follow the code
                ex = ((x >> np.uint32(13)) & np.uint32(4)) | ((x >> np.uint32(8)) & np.uint32(3))
                c |= np.uint64(ex) << ln
                ln += np.uint64(3)
            acc |= c << nacc
            nacc += ln
            if nacc >= np.uint64(32):  # < 32 pending + <= 23 new bits fit the accumulator
                store_u32(scratch, pos, acc)
                pos += 4
                acc >>= np.uint64(32)
                nacc -= np.uint64(32)
            if kind == 3:
                r = raw_off + 3 * i
                out[r] = np.uint8(x & np.uint32(0xFF))
                out[r + 1] = np.uint8((x >> np.uint32(8)) & np.uint32(0xFF))
                out[r + 2] = np.uint8(((x >> np.uint32(16)) & np.uint32(0x7F))
                                      | ((x >> np.uint32(24)) & np.uint32(0x80)))
            elif kind == 1:
                out[raw_off + i] = np.uint8(((x >> np.uint32(8)) & np.uint32(0x80))
                                            | (x & np.uint32(0x7F)))
            else:
                out[raw_off + i] = np.uint8(x & np.uint32(0xFF))
        while nacc > np.uint64(0):
            scratch[pos] = np.uint8(acc & np.uint64(0xFF))
            acc >>= np.uint64(8)
            nacc -= min(nacc, np.uint64(8))
            pos += 1
        if pos != stream_bytes[b]:
            return -1
        o = stream_off[b]
        out[o:o + pos] = scratch[:pos]
    return 0


@nb.njit(nogil=True, cache=True)
def decode_blocks(buf, counter, n_blocks, n, kind, base, dec, raw_off, stream_off,
                  stream_bytes, out):
    """Decode every block into ``out`` (raw bits). Returns 0 or a negative error code; every
    read is bounds-checked, so corrupt bytes cannot crash the process (the message checksum
    is verified before this runs, so errors here mean a crafted message)."""
    eb = np.uint64(5 if kind == 2 else 8)
    xb = np.uint64(3 if kind == 2 else 0)
    emax = np.int64(31 if kind == 2 else 255)
    mask = np.uint64((1 << MAX_LEN) - 1)
    while True:
        b = take(counter)
        if b >= n_blocks:
            break
        a = b * BLOCK_VALUES
        z = min(n, a + BLOCK_VALUES)
        p = np.uint64(stream_off[b]) * np.uint64(8)
        pend = p + np.uint64(stream_bytes[b]) * np.uint64(8)
        for i in range(a, z):
            if p >= pend:
                return -1
            v = load_u64(buf, p >> np.uint64(3)) >> (p & np.uint64(7))
            t = np.uint64(dec[v & mask])
            ln = t >> np.uint64(8)
            if ln == np.uint64(0):
                return -2
            s = np.int64(t & np.uint64(0xFF))
            if s == ESC:
                e = np.int64((v >> ln) & ((np.uint64(1) << eb) - np.uint64(1)))
                ln += eb
            elif s == ZERO:
                e = 0
            else:
                e = base + s
                if e < 0 or e > emax:
                    return -3
            ex = (v >> ln) & ((np.uint64(1) << xb) - np.uint64(1))
            p += ln + xb
            ue = np.uint32(e)
            if kind == 1:
                r = np.uint32(buf[raw_off + i])
                out[i] = np.uint16(((r & np.uint32(0x80)) << np.uint32(8)) | (ue << np.uint32(7))
                                   | (r & np.uint32(0x7F)))
            elif kind == 2:
                r = np.uint32(buf[raw_off + i])
                x3 = np.uint32(ex)
                out[i] = np.uint16(((x3 & np.uint32(4)) << np.uint32(13)) | (ue << np.uint32(10))
                                   | ((x3 & np.uint32(3)) << np.uint32(8)) | r)
            else:
                q = raw_off + 3 * i
                b2 = np.uint32(buf[q + 2])
                out[i] = (((b2 & np.uint32(0x80)) << np.uint32(24)) | (ue << np.uint32(23))
                          | ((b2 & np.uint32(0x7F)) << np.uint32(16))
                          | (np.uint32(buf[q + 1]) << np.uint32(8)) | np.uint32(buf[q]))
        if (p + np.uint64(7)) // np.uint64(8) != pend // np.uint64(8):
            return -4
    return 0
