"""Entropy codec: Huffman-coded exponents in independent chunks, sign and mantissa stored raw.

The idea of DFloat11 (Zhang et al., 2025) and ZipNN (Hershcovitch et al., 2024): in trained
weights the exponent byte carries ~2.6 bits of information and the sign+mantissa byte ~8, so
coding only the exponent reaches the bound ``16 / (8 + H_exp)`` for bf16.

Split of each value into a Huffman symbol and raw bytes:

- bf16: symbol = exponent (8 bits); raw = ``sign<<7 | mantissa`` (1 byte).
- fp16: symbol = high byte ``sign | exponent(5) | mantissa[9:8]``; raw = mantissa[7:0]. The
  5-bit exponent does not fill a byte, so the three extra bits ride in the Huffman symbol
  instead of being bit-packed; the code still spends ~3 bits on them.
- fp32: symbol = exponent (8 bits); raw = 3 bytes ``m[7:0], m[15:8], sign<<7 | m[22:16]``.

Layout (little-endian)::

    payload = u8 dtype_code | u8 max_code_len | u16 0 | u32 chunk_values | u64 n_values
              | u64 n_chunks | u64 chunk_end[n_chunks] | chunks...
    chunk   = u8 mode=1 | raw value bytes                         (stored: incompressible)
            | u8 mode=0 | u8 lo | u8 hi | nibble code lengths of symbols lo..hi
              | u32 stream_bytes[4] | raw bytes (n * raw_width) | stream0..3

A chunk holds 256 KiB of original bytes (aligned with the checksum segments) and carries its
own canonical code, so chunks decode independently, in parallel threads that take the next
chunk from a shared atomic counter (``run_shared``). Inside a chunk,
the values are split into four contiguous quarters, each its own bit stream (LSB-first, 8 zero
bytes of padding); encoder and decoder advance the four streams in lockstep, which hides the
latency of each stream's serial dependency. Codes are limited to 12 bits, so a 4096-entry table
indexed by the next 12 bits yields up to four whole symbols per lookup, and four lookups run
off one 64-bit read. The payload ends in zero padding so those reads stay in bounds.
"""

from __future__ import annotations

import struct

import numpy as np

from moeflow._deps import require
from moeflow.compress._intrinsics import load_u64, store_u32
from moeflow.compress.bits import FLOAT_SPECS, float_spec, readonly, words_view
from moeflow.compress.checksum import (
    CHECKSUM_VERSION,
    SEGMENT_BYTES,
    digest_finish,
    digest_init,
    digest_range,
    digest_range_v1,
    digest_stripes,
)
from moeflow.compress.parallel import run_shared, take
from moeflow.errors import CorruptDataError, InputError

nb = require("numba", "moeflow.compress")

MAX_LEN = 12
TABLE_SIZE = 1 << MAX_LEN
# multi-symbol table entry: sym0..sym3 in bytes 0..3 | bits used << 32 | count << 56, so that
# ``entry >> 32`` is the step ``bits + (count << 24)`` of the decoder's packed stream state
MULTI_USED = 32
MULTI_COUNT = 56
HEADER = struct.Struct("<BBHIQQ")
_KIND = {"bfloat16": 1, "float16": 2, "float32": 3}
_RAW_WIDTH = {1: 1, 2: 1, 3: 3}
CHUNK_OVERHEAD = 1 + 2 + 128 + 16 + 4 * 9  # bound on a Huffman chunk's non-data bytes


# ----------------------------------------------------------------------------- Huffman code
@nb.njit(nogil=True, cache=True)
def huffman_lengths(counts, max_len):
    """Code lengths (<= max_len) for symbol counts: Huffman's two-queue construction, then a
    Kraft-sum repair for codes that were too long (rarest symbols get lengthened first)."""
    lengths = np.zeros(256, np.int64)
    m = 0
    syms = np.empty(256, np.int64)
    for s in range(256):  # insertion sort by count (stable); cheap to compile, <= 256 items
        if counts[s] > 0:
            j = m
            while j > 0 and counts[syms[j - 1]] > counts[s]:
                syms[j] = syms[j - 1]
                j -= 1
            syms[j] = s
            m += 1
    if m == 0:
        return lengths
    if m == 1:
        lengths[syms[0]] = 1
        return lengths
    weight = np.empty(2 * m - 1, np.int64)
    parent = np.empty(2 * m - 1, np.int64)
    for i in range(m):
        weight[i] = counts[syms[i]]
    leaf = 0
    inner = m
    nxt = m
    for _ in range(m - 1):
        for _t in range(2):  # take the lighter head of the leaf and inner-node queues
            if leaf < m and (inner >= nxt or weight[leaf] <= weight[inner]):
                pick = leaf
                leaf += 1
            else:
                pick = inner
                inner += 1
            weight[nxt] = weight[nxt] + weight[pick] if _t else weight[pick]
            parent[pick] = nxt
        nxt += 1
    depth = np.zeros(2 * m - 1, np.int64)
    for node in range(2 * m - 3, -1, -1):
        depth[node] = depth[parent[node]] + 1
    cap = 1 << max_len
    kraft = 0
    for i in range(m):
        d = min(depth[i], max_len)
        lengths[syms[i]] = d
        kraft += 1 << (max_len - d)
    while kraft > cap:  # lengthen the rarest codes that still can grow
        for i in range(m):
            s = syms[i]
            if lengths[s] < max_len:
                kraft -= 1 << (max_len - lengths[s] - 1)
                lengths[s] += 1
                if kraft <= cap:
                    break
    for i in range(m - 1, -1, -1):  # spend any slack on the most frequent symbols
        s = syms[i]
        while lengths[s] > 1 and kraft + (1 << (max_len - lengths[s])) <= cap:
            kraft += 1 << (max_len - lengths[s])
            lengths[s] -= 1
    return lengths


@nb.njit(nogil=True, cache=True)
def canonical_codes(lengths, max_len):
    """Canonical codes, bit-reversed for an LSB-first stream. Returns (codes, ok) where ok is
    False when the lengths violate Kraft's inequality (corrupt input)."""
    bl_count = np.zeros(max_len + 2, np.int64)
    for s in range(256):
        if lengths[s] > max_len or lengths[s] < 0:
            return np.zeros(256, np.uint64), False
        bl_count[lengths[s]] += 1
    bl_count[0] = 0
    kraft = 0
    for l in range(1, max_len + 1):
        kraft += bl_count[l] << (max_len - l)
    if kraft > (1 << max_len):
        return np.zeros(256, np.uint64), False
    next_code = np.zeros(max_len + 2, np.int64)
    code = 0
    for l in range(1, max_len + 1):
        code = (code + bl_count[l - 1]) << 1
        next_code[l] = code
    codes = np.zeros(256, np.uint64)
    for s in range(256):
        l = lengths[s]
        if l > 0:
            c = next_code[l]
            next_code[l] += 1
            r = 0
            for _ in range(l):
                r = (r << 1) | (c & 1)
                c >>= 1
            codes[s] = r
    return codes, True


# ----------------------------------------------------------------------------- encode
@nb.njit(nogil=True, cache=True)
def _split16(kind, vals, syms, raw):
    if kind == 1:
        for i in range(vals.shape[0]):
            v = vals[i]
            syms[i] = np.uint8((v >> np.uint16(7)) & np.uint16(0xFF))
            raw[i] = np.uint8(((v >> np.uint16(8)) & np.uint16(0x80)) | (v & np.uint16(0x7F)))
    else:
        for i in range(vals.shape[0]):
            v = vals[i]
            syms[i] = np.uint8(v >> np.uint16(8))
            raw[i] = np.uint8(v & np.uint16(0xFF))


@nb.njit(nogil=True, cache=True)
def _split32(vals, syms, raw):
    for i in range(vals.shape[0]):
        v = vals[i]
        syms[i] = np.uint8((v >> np.uint32(23)) & np.uint32(0xFF))
        raw[3 * i] = np.uint8(v & np.uint32(0xFF))
        raw[3 * i + 1] = np.uint8((v >> np.uint32(8)) & np.uint32(0xFF))
        raw[3 * i + 2] = np.uint8(
            ((v >> np.uint32(16)) & np.uint32(0x7F)) | ((v >> np.uint32(24)) & np.uint32(0x80))
        )


@nb.njit(nogil=True, cache=True)
def _split(vals, a, n, kind, syms, raw):
    """Symbols into ``syms[:n]`` and raw bytes into ``raw`` (vectorized loops)."""
    if kind == 3:
        _split32(vals[a : a + n], syms[:n], raw[: 3 * n])
    else:
        _split16(kind, vals[a : a + n], syms[:n], raw[:n])


@nb.njit(nogil=True, cache=True)
def chunk_histogram(syms, n):
    # four sub-histograms: consecutive equal symbols would otherwise serialize on one counter
    h = np.zeros(1024, np.int64)
    m = n // 4 * 4
    for i in range(0, m, 4):
        h[np.uint64(syms[i])] += 1
        h[np.uint64(256) + np.uint64(syms[i + 1])] += 1
        h[np.uint64(512) + np.uint64(syms[i + 2])] += 1
        h[np.uint64(768) + np.uint64(syms[i + 3])] += 1
    for i in range(m, n):
        h[np.uint64(syms[i])] += 1
    return h[0:256] + h[256:512] + h[512:768] + h[768:1024]


@nb.njit(inline="always")
def _store8(wb, pos, acc):
    """``acc`` as 8 little-endian bytes at ``wb[pos:]`` (LLVM merges these into one store)."""
    u = np.uint64
    p = u(pos)
    m = u(0xFF)
    wb[p] = np.uint8(acc & m)
    wb[p + u(1)] = np.uint8((acc >> u(8)) & m)
    wb[p + u(2)] = np.uint8((acc >> u(16)) & m)
    wb[p + u(3)] = np.uint8((acc >> u(24)) & m)
    wb[p + u(4)] = np.uint8((acc >> u(32)) & m)
    wb[p + u(5)] = np.uint8((acc >> u(40)) & m)
    wb[p + u(6)] = np.uint8((acc >> u(48)) & m)
    wb[p + u(7)] = np.uint8(acc >> u(56))


@nb.njit(inline="always")
def _flush(acc, nacc, pos, wb):
    """Store the pending bits and move on by their whole bytes; < 8 bits stay pending."""
    _store8(wb, pos, acc)
    nbytes = nacc >> np.uint64(3)
    return acc >> (nbytes << np.uint64(3)), nacc & np.uint64(7), pos + np.int64(nbytes)


@nb.njit(inline="always")
def _put2b(e, f, acc, nacc, pos, wb):
    """Append two codes (code | length << 32, each <= 24 bits) to a byte stream, then flush:
    < 8 bits are pending before, so 8 + 48 bits fit the 64-bit accumulator."""
    acc |= (e & np.uint64(0xFFFFFFFF)) << nacc
    nacc += e >> np.uint64(32)
    acc |= (f & np.uint64(0xFFFFFFFF)) << nacc
    nacc += f >> np.uint64(32)
    return _flush(acc, nacc, pos, wb)


@nb.njit(inline="always")
def _put1b(e, acc, nacc, pos, wb):
    acc |= (e & np.uint64(0xFFFFFFFF)) << nacc
    nacc += e >> np.uint64(32)
    return _flush(acc, nacc, pos, wb)


@nb.njit(inline="always")
def _pair_at(syms, i):
    return np.int64(syms[i]) | (np.int64(syms[i + 1]) << 8)


@nb.njit(nogil=True, cache=True)
def exponents_of(vals, a, n, kind, syms):
    """Symbols of ``vals[a:a+n]`` into ``syms[:n]`` (pass 1 needs no raw bytes)."""
    v = vals[a : a + n]
    if kind == 3:
        for i in range(n):
            syms[i] = np.uint8((v[i] >> np.uint32(23)) & np.uint32(0xFF))
    elif kind == 1:
        for i in range(n):
            syms[i] = np.uint8((v[i] >> np.uint16(7)) & np.uint16(0xFF))
    else:
        for i in range(n):
            syms[i] = np.uint8(v[i] >> np.uint16(8))


@nb.njit(nogil=True, cache=True)
def _plan_chunk(syms, n, kind, itemsize, lengths_row, sbytes_row):
    """Pass 1 for one chunk: its code lengths and the exact byte length of each of its four
    streams (``sbytes_row[0] = -1`` marks a chunk stored raw). Returns the chunk's bytes."""
    raw_w = 3 if kind == 3 else 1
    lengths_row[:] = 0
    if n == 0:
        sbytes_row[0] = -1
        return 1
    q = (n + 3) // 4
    hq = np.zeros((4, 256), np.int64)
    for j in range(4):
        lo_j = min(n, j * q)
        hi_j = min(n, (j + 1) * q)
        hq[j] = chunk_histogram(syms[lo_j:hi_j], hi_j - lo_j)
    counts = hq[0] + hq[1] + hq[2] + hq[3]
    lengths = huffman_lengths(counts, MAX_LEN)
    bits = 0
    lo = 255
    hi = 0
    for j in range(4):
        bj = 0
        for s in range(256):
            bj += hq[j, s] * lengths[s]
        sbytes_row[j] = (bj + 7) // 8
        bits += bj
    for s in range(256):
        if counts[s] > 0:
            lo = min(lo, s)
            hi = max(hi, s)
    if CHUNK_OVERHEAD + n * raw_w + (bits + 7) // 8 >= n * itemsize:
        sbytes_row[0] = -1
        return 1 + n * itemsize
    for s in range(256):
        lengths_row[s] = lengths[s]
    return (
        3
        + (hi - lo + 2) // 2
        + 16
        + n * raw_w
        + sbytes_row[0]
        + sbytes_row[1]
        + sbytes_row[2]
        + sbytes_row[3]
        + 32
    )


@nb.njit(nogil=True, cache=True)
def _plan_range(
    vals,
    u8,
    words,
    counter,
    n_chunks,
    chunk_values,
    kind,
    itemsize,
    lengths,
    sbytes,
    sizes,
    seg_out,
):
    n_total = vals.shape[0]
    syms = np.empty(chunk_values, np.uint8)
    while True:
        c = take(counter)
        if c >= n_chunks:
            break
        a = c * chunk_values
        n = min(chunk_values, n_total - a)
        exponents_of(vals, a, n, kind, syms)
        sizes[c] = _plan_chunk(syms, n, kind, itemsize, lengths[c], sbytes[c])
        seg_out[c] = digest_range(u8, words, a * itemsize, (a + n) * itemsize, c)


@nb.njit(nogil=True, cache=True)
def _write_chunk(vals, a, n, kind, itemsize, out, o, syms, lengths, sbytes, pair, present):
    """Pass 2 for one chunk: write it at ``out[o:]``, straight into its final place (its size
    is known from pass 1). Returns 0, or -1 if the streams came out another size than planned.
    """
    raw_w = 3 if kind == 3 else 1
    if sbytes[0] < 0:  # stored raw
        out[o] = 1
        p = o + 1
        for i in range(a, a + n):
            v = np.uint32(vals[i])
            for b in range(itemsize):
                out[p + b] = (v >> (8 * b)) & 0xFF
            p += itemsize
        return 0
    lo = 255
    hi = 0
    m = 0
    for s in range(256):
        if lengths[s] > 0:
            lo = min(lo, s)
            hi = max(hi, s)
            present[m] = s
            m += 1
    codes, _ok = canonical_codes(lengths, MAX_LEN)
    out[o] = 0
    out[o + 1] = lo
    out[o + 2] = hi
    p = o + 3
    nsym = hi - lo + 1
    for k in range((nsym + 1) // 2):
        s0 = lo + 2 * k
        b = lengths[s0]
        if s0 + 1 <= hi:
            b |= lengths[s0 + 1] << 4
        out[p + k] = b
    p += (nsym + 1) // 2
    for j in range(4):
        sl = sbytes[j] + 8
        for b in range(4):
            out[p + 4 * j + b] = (sl >> (8 * b)) & 0xFF
    p += 16
    _split(vals, a, n, kind, syms, out[p : p + n * raw_w])  # raw bytes land in place
    p += n * raw_w
    q = (n + 3) // 4
    cl = np.zeros(256, np.uint64)  # code | length << 32
    for s in range(256):
        cl[s] = codes[s] | (np.uint64(lengths[s]) << np.uint64(32))
    # pair table: entry ``s0 | s1 << 8`` is both codes back to back (<= 24 bits) and their
    # summed length, so one lookup and one append code two symbols; only pairs of symbols
    # present in the chunk are written (the others are never read)
    for x in range(m):
        s0 = present[x]
        l0 = np.uint64(lengths[s0])
        for y in range(m):
            s1 = present[y]
            pair[s0 | (s1 << 8)] = (codes[s0] | (codes[s1] << l0)) | (
                (l0 + np.uint64(lengths[s1])) << np.uint64(32)
            )
    start = np.empty(4, np.int64)
    cnt = np.empty(4, np.int64)
    for j in range(4):
        start[j] = p
        p += sbytes[j] + 8
        cnt[j] = max(0, min(n, (j + 1) * q) - j * q)
    # Streams are written in place. A flush stores 8 bytes at the stream's byte cursor, and
    # the bytes past its pending bits are zero, so a stream never writes beyond its own
    # 8 bytes of zero padding into the next stream.
    a0, a1, a2, a3 = np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0)
    n0, n1, n2, n3 = np.uint64(0), np.uint64(0), np.uint64(0), np.uint64(0)
    k0, k1, k2, k3 = start[0], start[1], start[2], start[3]
    nquads = cnt[3] // 4  # groups of two pairs every stream has (stream 3 is the shortest)
    # four streams interleaved (independent dependency chains), two pairs per flush
    if q % 2 == 0:  # every stream starts at an even symbol: read pairs as uint16 words
        s16 = syms[: n // 2 * 2].view(np.uint16)
        h = q // 2
        for i in range(0, 2 * nquads, 2):
            a0, n0, k0 = _put2b(pair[s16[i]], pair[s16[i + 1]], a0, n0, k0, out)
            a1, n1, k1 = _put2b(pair[s16[i + h]], pair[s16[i + h + 1]], a1, n1, k1, out)
            a2, n2, k2 = _put2b(pair[s16[i + 2 * h]], pair[s16[i + 2 * h + 1]], a2, n2, k2, out)
            a3, n3, k3 = _put2b(pair[s16[i + 3 * h]], pair[s16[i + 3 * h + 1]], a3, n3, k3, out)
    else:
        for i in range(0, 4 * nquads, 4):
            a0, n0, k0 = _put2b(
                pair[_pair_at(syms, i)], pair[_pair_at(syms, i + 2)], a0, n0, k0, out
            )
            a1, n1, k1 = _put2b(
                pair[_pair_at(syms, i + q)], pair[_pair_at(syms, i + q + 2)], a1, n1, k1, out
            )
            a2, n2, k2 = _put2b(
                pair[_pair_at(syms, i + 2 * q)],
                pair[_pair_at(syms, i + 2 * q + 2)],
                a2,
                n2,
                k2,
                out,
            )
            a3, n3, k3 = _put2b(
                pair[_pair_at(syms, i + 3 * q)],
                pair[_pair_at(syms, i + 3 * q + 2)],
                a3,
                n3,
                k3,
                out,
            )
    accs = np.array([a0, a1, a2, a3], np.uint64)
    nacs = np.array([n0, n1, n2, n3], np.uint64)
    ks = np.array([k0, k1, k2, k3], np.int64)
    for j in range(4):
        acc, nacc, k = accs[j], nacs[j], ks[j]
        for i in range(j * q + 4 * nquads, j * q + cnt[j]):
            acc, nacc, k = _put1b(cl[syms[i]], acc, nacc, k, out)
        if k - start[j] + (np.int64(nacc) + 7) // 8 != sbytes[j]:
            return -1
        _store8(out, k, acc)  # the last partial byte, then zeros
        out[start[j] + sbytes[j] : start[j] + sbytes[j] + 8] = 0
    return 0


@nb.njit(nogil=True, cache=True)
def write_range(
    vals, counter, n_chunks, chunk_values, kind, itemsize, out, offsets, lengths, sbytes
):
    n_total = vals.shape[0]
    syms = np.empty(chunk_values, np.uint8)
    pair = np.empty(1 << 16, np.uint64)
    present = np.empty(256, np.int64)
    while True:
        c = take(counter)
        if c >= n_chunks:
            break
        a = c * chunk_values
        n = min(chunk_values, n_total - a)
        if (
            _write_chunk(
                vals,
                a,
                n,
                kind,
                itemsize,
                out,
                offsets[c],
                syms,
                lengths[c],
                sbytes[c],
                pair,
                present,
            )
            != 0
        ):
            return -1
    return 0


def encode(bits: np.ndarray, dtype: str, threads: int | None = None):
    """Encode raw value bits (flat uint16/uint32). Returns (payload, segment digests).

    Two parallel passes over the chunks. Pass 1 takes each chunk's exponent histograms (one
    per stream), its code lengths and so its exact size in bytes; pass 2 writes every chunk
    straight into its final place in a payload allocated at its exact size, so nothing is
    moved or copied afterwards.
    """
    spec = float_spec(dtype)
    kind = _KIND[dtype]
    vals = readonly(np.ascontiguousarray(bits).reshape(-1))
    assert vals.dtype == spec.uint
    n = vals.size
    chunk_values = SEGMENT_BYTES // spec.itemsize
    n_chunks = (n + chunk_values - 1) // chunk_values
    lengths = np.zeros((n_chunks, 256), np.int64)
    sbytes = np.zeros((n_chunks, 4), np.int64)
    sizes = np.zeros(n_chunks, np.int64)
    seg = np.zeros(n_chunks, np.uint64)
    u8 = readonly(vals.view(np.uint8))
    w = words_view(u8)
    if n_chunks:
        run_shared(
            lambda ctr: _plan_range(
                vals,
                u8,
                w,
                ctr,
                n_chunks,
                chunk_values,
                kind,
                spec.itemsize,
                lengths,
                sbytes,
                sizes,
                seg,
            ),
            n_chunks,
            threads,
        )
    ends = np.cumsum(sizes)
    base = HEADER.size + 8 * n_chunks
    body = base + (int(ends[-1]) if n_chunks else 0)
    # zero tail: whole 64-bit words, plus one, so the decoder's two-word peeks stay in bounds
    out = np.empty(body + (-body) % 8 + 8, np.uint8)
    out[:base] = np.frombuffer(
        HEADER.pack(spec.code, MAX_LEN, 0, chunk_values, n, n_chunks)
        + ends.astype(np.uint64).tobytes(),
        np.uint8,
    )
    out[body:] = 0
    offsets = base + ends - sizes
    if n_chunks:
        errs = run_shared(
            lambda ctr: write_range(
                vals,
                ctr,
                n_chunks,
                chunk_values,
                kind,
                spec.itemsize,
                out,
                offsets,
                lengths,
                sbytes,
            ),
            n_chunks,
            threads,
        )
        if any(errs):  # an encoder bug, not bad input: never ship a payload that may be wrong
            raise RuntimeError("entropy encoder wrote streams of another size than planned")
    return out, seg


# ----------------------------------------------------------------------------- decode
@nb.njit(inline="always")
def _peek(words, p):
    """The 64 bits of the payload from absolute bit ``p`` on (two word loads)."""
    w = np.uint64(p >> 6)
    o = np.uint64(p & 63)
    return (words[w] >> o) | ((words[w + np.uint64(1)] << np.uint64(1)) << (np.uint64(63) - o))


@nb.njit(nogil=True, cache=True)
def _compose16(kind, syms, raw, out):
    """bf16/fp16 values from symbols and raw bytes. Same-width constants and whole-slice
    arguments let LLVM vectorize this loop (10x over offset indexing)."""
    if kind == 1:
        for i in range(out.shape[0]):
            b = np.uint16(raw[i])
            out[i] = (
                ((b & np.uint16(0x80)) << np.uint16(8))
                | (np.uint16(syms[i]) << np.uint16(7))
                | (b & np.uint16(0x7F))
            )
    else:
        for i in range(out.shape[0]):
            out[i] = (np.uint16(syms[i]) << np.uint16(8)) | np.uint16(raw[i])


@nb.njit(nogil=True, cache=True)
def _compose32(syms, raw, out):
    for i in range(out.shape[0]):
        b2 = np.uint32(raw[3 * i + 2])
        out[i] = (
            ((b2 & np.uint32(0x80)) << np.uint32(24))
            | (np.uint32(syms[i]) << np.uint32(23))
            | ((b2 & np.uint32(0x7F)) << np.uint32(16))
            | (np.uint32(raw[3 * i + 1]) << np.uint32(8))
            | np.uint32(raw[3 * i])
        )


COMPOSE_BLOCK = 4096  # values composed, then digested, while they are in L1


@nb.njit(nogil=True, cache=True)
def _compose_digest(kind, itemsize, syms, buf, raw, n, out, a, u8, words, seed):
    """Compose ``out[a:a+n]`` block by block and feed each block into the version-2 digest
    of that byte range right after writing it (same digest as ``digest_range``). A block's
    bytes are a multiple of the 64-byte stripe, so blocks end on stripe boundaries."""
    start = a * itemsize
    sd, lanes, keys = digest_init(seed)
    w = start // 8
    for b0 in range(0, n, COMPOSE_BLOCK):
        b1 = min(n, b0 + COMPOSE_BLOCK)
        if kind == 3:
            _compose32(syms[b0:b1], buf[raw + 3 * b0 : raw + 3 * b1], out[a + b0 : a + b1])
        else:
            _compose16(kind, syms[b0:b1], buf[raw + b0 : raw + b1], out[a + b0 : a + b1])
        w, lanes, keys = digest_stripes(words, w, (a + b1) * itemsize // 8, lanes, keys)
    return digest_finish(u8, words, start, (a + n) * itemsize, w, sd, lanes)


@nb.njit(nogil=True, cache=True)
def _compose_all(kind, syms, buf, raw, n, out, a):
    if kind == 3:
        _compose32(syms[:n], buf[raw : raw + 3 * n], out[a : a + n])
    else:
        _compose16(kind, syms[:n], buf[raw : raw + n], out[a : a + n])


@nb.njit(inline="always")
def _run4(buf, multi, pbase, st, syms):
    """Four table lookups from one 64-bit peek (each consumes <= 12 bits) on a stream whose
    state is packed in one register, ``st = o << 24 | bits read``: an entry's ``>> 32`` is
    ``bits + (count << 24)``, so one add moves both, and ``v >>= step`` shifts by the bits
    alone (the shift count only looks at its low 6 bits).

    The peek is one unaligned load at the byte holding bit ``p``, shifted by ``p & 7``: at
    least 57 valid bits, 48 used. Each lookup stores its four symbol bytes at once; bytes
    past ``count`` are overwritten by the stream's next lookup (or its tail loop)."""
    p = pbase + (st & M24)
    v = load_u64(buf, p >> np.uint64(3)) >> (p & np.uint64(7))
    mask = np.uint64(TABLE_SIZE - 1)
    for _ in range(4):
        t = multi[v & mask]
        store_u32(syms, st >> np.uint64(24), t)
        step = t >> np.uint64(32)
        v >>= step & np.uint64(63)
        st += step
    return st


M24 = np.uint64((1 << 24) - 1)


@nb.njit(inline="always")
def _node(multi, unc, ustart, p, used, ent):
    """Entry ``ent`` (codes decoded so far: pattern ``p`` of ``used`` bits) goes to every
    index ``p | x << used`` whose next bits ``x`` start no code that fits the rest."""
    r = MAX_LEN - used
    for i in range(ustart[r], ustart[r + 1]):
        multi[p | (np.int64(unc[i]) << used)] = np.uint64(ent)


@nb.njit(nogil=True, cache=True)
def _build_multi(lengths, codes, single, multi, order, unc):
    """Multi-symbol table: entry ``idx`` decodes up to four whole codes from the 12 bits
    ``idx``: sym0..sym3 in bytes 0..3 | bits used << 32 | count << 56.

    Every chunk has its own code and most chunks rebuild this table, so it is written once
    per entry instead of being searched per entry: a depth-first walk over sequences of up
    to four codes (symbols by code length, so each level stops at the first code that does
    not fit), where a sequence owns the indices whose following bits start no code that
    fits in the bits left. Those "uncovered" patterns depend only on the number of bits
    left, ``r``, and are listed once per table: ``unc[ustart[r]:ustart[r + 1]]``. The last
    level (a fourth code after three) is one pass over the bits left instead.
    """
    m = 0
    for l in range(1, MAX_LEN + 1):
        for s in range(256):
            if lengths[s] == l:
                order[m] = s
                m += 1
    # a node below the root has used >= the shortest length, so r <= MAX_LEN - shortest;
    # the root's list (r = MAX_LEN: patterns that start no code) is empty for a complete code
    ustart = np.zeros(MAX_LEN + 2, np.int64)
    kraft = 0
    for i in range(m):
        kraft += 1 << (MAX_LEN - lengths[order[i]])
    r_hi = MAX_LEN if kraft < TABLE_SIZE else MAX_LEN - lengths[order[0]] if m else 0
    k = 0
    for r in range(MAX_LEN + 1):
        ustart[r] = k
        if r > r_hi:
            continue
        for x in range(1 << r):
            l = np.int64(single[x]) >> 8
            if l == 0 or l > r:
                unc[k] = x
                k += 1
    ustart[MAX_LEN + 1] = k
    _node(multi, unc, ustart, 0, 0, 0)  # bits that start no code at all: invalid entries
    for a in range(m):
        s1 = order[a]
        u1 = lengths[s1]
        p1 = np.int64(codes[s1])
        _node(multi, unc, ustart, p1, u1, s1 | (u1 << MULTI_USED) | (1 << MULTI_COUNT))
        for b in range(m):
            s2 = order[b]
            if u1 + lengths[s2] > MAX_LEN:
                break
            p2 = p1 | (np.int64(codes[s2]) << u1)
            u2 = u1 + lengths[s2]
            e2 = s1 | (s2 << 8)
            _node(multi, unc, ustart, p2, u2, e2 | (u2 << MULTI_USED) | (2 << MULTI_COUNT))
            for c in range(m):
                s3 = order[c]
                if u2 + lengths[s3] > MAX_LEN:
                    break
                p3 = p2 | (np.int64(codes[s3]) << u2)
                u3 = u2 + lengths[s3]
                e3 = e2 | (s3 << 16) | (u3 << MULTI_USED) | (3 << MULTI_COUNT)
                # the last level in one branch-free pass over the r bits left: a fourth code
                # that fits (looked up in ``single``) is added to the entry, else it keeps 3
                r = MAX_LEN - u3
                for x in range(1 << r):
                    e = np.int64(single[x])
                    l = e >> 8
                    ok = np.int64(l != 0) & np.int64(l <= r)
                    multi[p3 | (x << u3)] = np.uint64(
                        e3 + ok * (((e & 0xFF) << 24) | (l << MULTI_USED) | (1 << MULTI_COUNT))
                    )


@nb.njit(nogil=True, cache=True)
def _decode_chunk(
    buf,
    words,
    pos,
    end,
    n,
    kind,
    itemsize,
    out,
    a,
    syms,
    single,
    multi,
    order,
    unc,
    prev,
    u8,
    owords,
    seg_out,
    c,
    version,
):
    """Decode one chunk ``buf[pos:end]`` into ``out[a:a+n]``. Returns 0, or a negative error
    code; every read is bounds-checked so corrupt bytes cannot crash the process.

    A 4096-entry table maps the next 12 bits to up to four whole symbols (~2.6 bits each for
    trained bf16 weights), so one lookup usually yields three or four exponents. The tables
    are rebuilt only when a chunk's code lengths differ from the previous chunk's (``prev``).
    """
    if pos >= end:
        return -1
    mode = buf[pos]
    pos += 1
    if mode == 1:
        if end - pos != n * itemsize:
            return -2
        for i in range(n):
            v = np.uint32(0)
            for b in range(itemsize):
                v |= np.uint32(buf[pos + i * itemsize + b]) << (8 * b)
            out[a + i] = v
        seg_out[c] = (
            digest_range(u8, owords, a * itemsize, (a + n) * itemsize, c)
            if version == 2
            else digest_range_v1(u8, owords, a * itemsize, (a + n) * itemsize, c)
        )
        return 0
    if mode != 0 or n == 0:
        return -3
    if pos + 2 > end:
        return -4
    lo = np.int64(buf[pos])
    hi = np.int64(buf[pos + 1])
    pos += 2
    if hi < lo:
        return -5
    nsym = hi - lo + 1
    if pos + (nsym + 1) // 2 + 16 > end:
        return -6
    lengths = np.zeros(256, np.int64)
    for k in range(nsym):
        lengths[lo + k] = (buf[pos + k // 2] >> (4 * (k & 1))) & 15
    pos += (nsym + 1) // 2
    slen = np.empty(4, np.int64)
    for j in range(4):
        sp = pos + 4 * j
        slen[j] = (
            np.int64(buf[sp])
            | (np.int64(buf[sp + 1]) << 8)
            | (np.int64(buf[sp + 2]) << 16)
            | (np.int64(buf[sp + 3]) << 24)
        )
    pos += 16
    raw_w = 3 if kind == 3 else 1
    raw = pos
    pos += n * raw_w
    sstart = np.empty(4, np.int64)
    for j in range(4):
        if slen[j] < 8:
            return -7
        sstart[j] = pos
        pos += slen[j]
    if pos != end or (end + 8) // 8 > words.shape[0]:
        return -8
    same = True
    for k in range(256):
        if lengths[k] != prev[k]:
            same = False
            break
    if not same:
        codes, ok = canonical_codes(lengths, MAX_LEN)
        if not ok:
            prev[0] = -1  # tables are now stale
            return -9
        single[:] = 0  # sym | len << 8; len 0 = invalid code
        for s in range(256):
            l = lengths[s]
            if l > 0:
                for idx in range(np.int64(codes[s]), TABLE_SIZE, 1 << l):
                    single[idx] = s | (l << 8)
        _build_multi(lengths, codes, single, multi, order, unc)
        prev[:] = lengths
    q = (n + 3) // 4
    o = np.empty(4, np.int64)
    oend = np.empty(4, np.int64)
    pb = np.empty(4, np.int64)
    lim = np.empty(4, np.int64)
    for j in range(4):
        o[j] = min(n, j * q)
        oend[j] = min(n, (j + 1) * q)
        pb[j] = sstart[j] * 8
        lim[j] = (sstart[j] + slen[j] - 8) * 8  # last bit position with 8 readable bytes
    mask = np.uint64(TABLE_SIZE - 1)
    # packed stream states for the main loop: o << 24 | bits read from the stream's start
    for j in range(4):
        if slen[j] * 8 >= 1 << 24:  # never for chunks this encoder writes
            return -13
    b0_, b1_ = np.uint64(pb[0]), np.uint64(pb[1])
    b2_, b3_ = np.uint64(pb[2]), np.uint64(pb[3])
    s0 = np.uint64(o[0]) << np.uint64(24)
    s1 = np.uint64(o[1]) << np.uint64(24)
    s2 = np.uint64(o[2]) << np.uint64(24)
    s3 = np.uint64(o[3]) << np.uint64(24)
    o0, o1, o2, o3 = o[0], o[1], o[2], o[3]
    p0, p1, p2, p3 = pb[0], pb[1], pb[2], pb[3]
    # a round writes <= 16 symbols per stream: stop before they could spill into the next stream
    e0_, e1_, e2_, e3_ = oend[0] - 16, oend[1] - 16, oend[2] - 16, oend[3] - 16
    l0, l1, l2, l3 = lim[0], lim[1], lim[2], lim[3]
    # An invalid code yields count 0 and stalls its stream (no per-lookup check here): a
    # valid stream gains >= 4 symbols per round, so the round cap is only reached by a
    # stalled stream, and the single-symbol tail loop below rejects the stalled position.
    # Checks are batched: a round moves each stream on by <= 16 symbols and <= 48 bits, so
    # from a checked state the next ``safe`` rounds cannot pass any limit and run unchecked.
    rounds = q // 4 + 2
    while o0 <= e0_ and o1 <= e1_ and o2 <= e2_ and o3 <= e3_:
        if p0 > l0 or p1 > l1 or p2 > l2 or p3 > l3:
            return -10
        safe = min(min((e0_ - o0) // 16, (e1_ - o1) // 16), min((e2_ - o2) // 16, (e3_ - o3) // 16))
        safe = (
            min(
                safe,
                min(min((l0 - p0) // 48, (l1 - p1) // 48), min((l2 - p2) // 48, (l3 - p3) // 48)),
            )
            + 1
        )
        rounds -= safe
        if rounds < 0:
            return -11
        for _ in range(safe):
            s0 = _run4(buf, multi, b0_, s0, syms)
            s1 = _run4(buf, multi, b1_, s1, syms)
            s2 = _run4(buf, multi, b2_, s2, syms)
            s3 = _run4(buf, multi, b3_, s3, syms)
        o0, p0 = np.int64(s0 >> np.uint64(24)), np.int64(b0_ + (s0 & M24))
        o1, p1 = np.int64(s1 >> np.uint64(24)), np.int64(b1_ + (s1 & M24))
        o2, p2 = np.int64(s2 >> np.uint64(24)), np.int64(b2_ + (s2 & M24))
        o3, p3 = np.int64(s3 >> np.uint64(24)), np.int64(b3_ + (s3 & M24))
    o[0], o[1], o[2], o[3] = o0, o1, o2, o3
    pb[0], pb[1], pb[2], pb[3] = p0, p1, p2, p3
    for j in range(4):
        p = pb[j]
        for i in range(o[j], oend[j]):
            if p > lim[j]:
                return -10
            e = single[_peek(words, p) & mask]
            if (e >> 8) == 0:
                return -11
            syms[i] = e & 0xFF
            p += e >> 8
        if (p + 7) // 8 != sstart[j] + slen[j] - 8:  # a stream must end in its last data byte
            return -12
    if version == 2:
        seg_out[c] = _compose_digest(kind, itemsize, syms, buf, raw, n, out, a, u8, owords, c)
    else:
        _compose_all(kind, syms, buf, raw, n, out, a)
        seg_out[c] = digest_range_v1(u8, owords, a * itemsize, (a + n) * itemsize, c)
    return 0


@nb.njit(nogil=True, cache=True)
def _decode_range(
    buf,
    bwords,
    base,
    ends,
    counter,
    chunk_values,
    n_total,
    kind,
    itemsize,
    out,
    u8,
    words,
    seg_out,
    version,
):
    syms = np.empty(chunk_values, np.uint8)
    single = np.zeros(TABLE_SIZE, np.uint32)
    multi = np.zeros(TABLE_SIZE, np.uint64)
    order = np.zeros(256, np.int64)
    unc = np.zeros(2 * TABLE_SIZE, np.int32)
    prev = np.full(256, -1, np.int64)
    n_chunks = ends.shape[0]
    while True:
        c = take(counter)
        if c >= n_chunks:
            break
        start = base + (ends[c - 1] if c > 0 else 0)
        a = c * chunk_values
        n = min(chunk_values, n_total - a)
        err = _decode_chunk(
            buf,
            bwords,
            start,
            base + ends[c],
            n,
            kind,
            itemsize,
            out,
            a,
            syms,
            single,
            multi,
            order,
            unc,
            prev,
            u8,
            words,
            seg_out,
            c,
            version,
        )
        if err != 0:
            return err
    return 0


def min_chunk_bytes(n: np.ndarray, itemsize: int, raw_width: int) -> np.ndarray:
    """Fewest bytes a chunk of ``n`` values can take: stored (mode byte + values) or Huffman
    (mode, lo, hi, >= 1 length byte, four u32 stream lengths, the raw bytes of every value,
    four streams of >= 8 bytes). Used to bound the value count a payload may claim."""
    return np.minimum(1 + n * itemsize, 1 + 2 + 1 + 16 + n * raw_width + 4 * 8)


def parse_header(buf: np.ndarray):
    """(spec, n_values, chunk_values, chunk ends, chunk base) of a payload, all validated
    against the payload's real size: the chunk table must fit, increase, give every chunk at
    least the bytes its values need (``min_chunk_bytes``), and end at the payload's end; so
    the value count, hence the output allocation, is bounded by the payload size."""
    if buf.size < HEADER.size:
        raise CorruptDataError(f"entropy payload of {buf.size} bytes is shorter than its header")
    code, max_len, _, chunk_values, n, n_chunks = HEADER.unpack_from(buf, 0)
    kinds = {s.code: s.name for s in FLOAT_SPECS.values()}
    if code not in kinds or max_len != MAX_LEN:
        raise CorruptDataError(f"entropy payload has dtype code {code}, max code length {max_len}")
    spec = FLOAT_SPECS[kinds[code]]
    if chunk_values != SEGMENT_BYTES // spec.itemsize:
        raise CorruptDataError(
            f"entropy payload chunk size {chunk_values} is not {SEGMENT_BYTES // spec.itemsize}"
        )
    if n_chunks != (n + chunk_values - 1) // chunk_values:
        raise CorruptDataError(f"entropy payload has {n_chunks} chunks for {n} values")
    base = HEADER.size + 8 * n_chunks
    if base > buf.size:
        raise CorruptDataError("entropy payload is truncated inside its chunk table")
    ends = readonly(buf[HEADER.size : base].view(np.uint64).astype(np.int64))
    body = base + (int(ends[-1]) if n_chunks else 0)
    if n_chunks and (np.any(np.diff(ends) <= 0) or ends[0] <= 0):
        raise CorruptDataError("entropy payload chunk table is not increasing")
    if n_chunks:
        counts = np.full(n_chunks, chunk_values, np.int64)
        counts[-1] = n - (n_chunks - 1) * chunk_values
        lens = np.diff(ends, prepend=0)
        short = lens < min_chunk_bytes(counts, spec.itemsize, _RAW_WIDTH[_KIND[spec.name]])
        if np.any(short):
            c = int(np.argmax(short))
            raise CorruptDataError(
                f"entropy payload chunk table gives chunk {c} of "
                f"{int(counts[c])} values only {int(lens[c])} bytes"
            )
    if buf.size != body + (-body) % 8 + 8 or np.any(buf[body:]):
        raise CorruptDataError("entropy payload chunk table does not match the payload size")
    return spec, n, chunk_values, ends, base


def decode(
    payload,
    dtype: str,
    n_expected: int,
    threads: int | None = None,
    checksum_version: int = CHECKSUM_VERSION,
    out: np.ndarray | None = None,
):
    """Decode a payload. Returns (flat uint bits, segment digests of ``checksum_version``);
    ``out`` (flat, contiguous, the dtype's uint, ``n_expected`` long) receives the bits if
    given."""
    buf = np.frombuffer(payload, np.uint8) if not isinstance(payload, np.ndarray) else payload
    buf = readonly(buf)
    spec, n, chunk_values, ends, base = parse_header(buf)
    if spec.name != dtype or n != n_expected:
        raise CorruptDataError(
            f"entropy payload holds {n} {spec.name} values; the container says {n_expected} {dtype}"
        )
    if out is None:
        out = np.empty(n, spec.uint)
    elif out.dtype != spec.uint or out.shape != (n,) or not out.flags.c_contiguous:
        raise InputError(f"out must be a contiguous {np.dtype(spec.uint).name}[{n}] array")
    n_chunks = ends.size
    seg = np.zeros(n_chunks, np.uint64)
    u8 = readonly(out.view(np.uint8))
    w = words_view(u8)
    kind = _KIND[dtype]
    bw = words_view(buf)
    errs = (
        run_shared(
            lambda ctr: _decode_range(
                buf,
                bw,
                base,
                ends,
                ctr,
                chunk_values,
                n,
                kind,
                spec.itemsize,
                out,
                u8,
                w,
                seg,
                checksum_version,
            ),
            n_chunks,
            threads,
        )
        if n_chunks
        else [0]
    )
    bad = [e for e in errs if e != 0]
    if bad:
        raise CorruptDataError(f"entropy chunk failed to decode (error {bad[0]})")
    return out, seg
