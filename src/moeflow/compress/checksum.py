"""mfx64, the checksum of moeflow's compressed formats: segment digests and their combination.

The bytes are cut into fixed 256 KiB segments; each segment gets a 64-bit digest seeded with
the segment index, and the segment digests are digested again with the total length.
Segments are independent, so the checksum of a decoded tensor is computed by the same threads
that decode it, while the data is still in cache (the entropy codec's chunks are aligned to
the segments).

Two segment digests exist; the container records which one it used (``CHECKSUM_VERSION``):

- version 2 (written now): eight lanes over little-endian 64-bit words. Each word ``d`` is
  XORed with a lane key that changes every 64-byte stripe, and ``d + lo32(x) * hi32(x)`` is
  added to the lane (the XXH3 accumulate idea: 32x32->64 multiplies vectorize on AVX2/NEON).
  The stripe-dependent keys make a word's contribution depend on its position, so moved or
  swapped words change the digest. Lanes, tail words and tail bytes are folded with xxHash64
  rounds and its avalanche. About 3x faster than version 1 here (23 vs 7 GB/s in cache).
- version 1: an xxHash64-style digest (four multiply-rotate lanes), read for old containers.
"""

from __future__ import annotations

import numpy as np

from moeflow._deps import require
from moeflow.compress.bits import readonly, words_view
from moeflow.compress.parallel import run_shared, take
from moeflow.errors import InputError

nb = require("numba", "moeflow.compress")

SEGMENT_BYTES = 1 << 18  # checksum segment; entropy chunks are aligned to it
_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)
_P5 = np.uint64(0x27D4EB2F165667C5)


@nb.njit(inline="always")
def _rotl(x, r):
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@nb.njit(inline="always")
def _round(acc, lane):
    acc = acc + lane * _P2
    acc = _rotl(acc, 31)
    return acc * _P1


@nb.njit(inline="always")
def _avalanche(h):
    h ^= h >> np.uint64(33)
    h *= _P2
    h ^= h >> np.uint64(29)
    h *= _P3
    h ^= h >> np.uint64(32)
    return h


@nb.njit(nogil=True, cache=True)
def digest_range_v1(buf, words, start, end, seed):
    """Version-1 digest: xxHash64-style, of ``buf[start:end]``; ``words`` is ``buf`` viewed
    as uint64 (its whole-word prefix) and ``start`` is a multiple of 8."""
    seed = np.uint64(seed)
    v1 = seed + _P1 + _P2
    v2 = seed + _P2
    v3 = seed
    v4 = seed - _P1
    w = start // 8
    wend = end // 8
    while w + 4 <= wend:
        v1 = _round(v1, words[w])
        v2 = _round(v2, words[w + 1])
        v3 = _round(v3, words[w + 2])
        v4 = _round(v4, words[w + 3])
        w += 4
    h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
    h += np.uint64(end - start)
    while w < wend:
        h ^= _round(np.uint64(0), words[w])
        h = _rotl(h, 27) * _P1 + _P4
        w += 1
    p = wend * 8
    while p < end:
        h ^= np.uint64(buf[p]) * _P5
        h = _rotl(h, 11) * _P1
        p += 1
    return _avalanche(h)


_M32 = np.uint64(0xFFFFFFFF)
_G = np.uint64(0x9FB21C651E98DF25)  # odd: the lane keys advance by it every stripe
_K0, _K1 = np.uint64(0xBE4BA423396CFEB8), np.uint64(0x1CAD21F72C81017C)
_K2, _K3 = np.uint64(0xDB979083E96DD4DE), np.uint64(0x1F67B3B7A4A44072)
_K4, _K5 = np.uint64(0x78E5C0CC4EE679CB), np.uint64(0x2172FFCC7DD05A82)
_K6, _K7 = np.uint64(0x8E2443F7744608B8), np.uint64(0x4C263A81E69035E0)


@nb.njit(inline="always")
def _acc(a, d, k):
    x = d ^ k
    return a + d + (x & _M32) * (x >> np.uint64(32))


@nb.njit(inline="always")
def _merge(h, v):
    h ^= _round(np.uint64(0), v)
    return _rotl(h, 27) * _P1 + _P4


@nb.njit(inline="always")
def digest_init(seed):
    """Version-2 digest state for a segment seeded with ``seed``: (sd, lanes, keys)."""
    sd = np.uint64(seed) * _P2
    return (
        sd,
        (sd ^ _K0, sd ^ _K1, sd ^ _K2, sd ^ _K3, sd ^ _K4, sd ^ _K5, sd ^ _K6, sd ^ _K7),
        (_K0 + sd, _K1 + sd, _K2 + sd, _K3 + sd, _K4 + sd, _K5 + sd, _K6 + sd, _K7 + sd),
    )


@nb.njit(inline="always")
def digest_stripes(words, w, wend, lanes, keys):
    """Feed the whole 64-byte stripes of ``words[w:wend]`` into the lanes; returns the next
    word index and the new lanes and keys. Indices are unsigned so that numba emits no
    negative-index fix-ups, which would stop LLVM from vectorizing the eight lanes."""
    u = np.uint64
    a0, a1, a2, a3, a4, a5, a6, a7 = lanes
    k0, k1, k2, k3, k4, k5, k6, k7 = keys
    w = u(w)
    while w + u(8) <= u(wend):
        a0 = _acc(a0, words[w], k0)
        a1 = _acc(a1, words[w + u(1)], k1)
        a2 = _acc(a2, words[w + u(2)], k2)
        a3 = _acc(a3, words[w + u(3)], k3)
        a4 = _acc(a4, words[w + u(4)], k4)
        a5 = _acc(a5, words[w + u(5)], k5)
        a6 = _acc(a6, words[w + u(6)], k6)
        a7 = _acc(a7, words[w + u(7)], k7)
        k0, k1, k2, k3 = k0 + _G, k1 + _G, k2 + _G, k3 + _G
        k4, k5, k6, k7 = k4 + _G, k5 + _G, k6 + _G, k7 + _G
        w += u(8)
    return w, (a0, a1, a2, a3, a4, a5, a6, a7), (k0, k1, k2, k3, k4, k5, k6, k7)


@nb.njit(inline="always")
def digest_finish(buf, words, start, end, w, sd, lanes):
    """Fold the lanes, then the tail words from ``w`` and the tail bytes, into the digest."""
    u = np.uint64
    a0, a1, a2, a3, a4, a5, a6, a7 = lanes
    h = (u(end) - u(start)) * _P5 + sd
    h = _merge(_merge(_merge(_merge(h, a0), a1), a2), a3)
    h = _merge(_merge(_merge(_merge(h, a4), a5), a6), a7)
    wend = u(end) // u(8)
    w = u(w)
    while w < wend:
        h = _merge(h, words[w])
        w += u(1)
    p = wend * u(8)
    while p < u(end):
        h ^= u(buf[p]) * _P5
        h = _rotl(h, 11) * _P1
        p += u(1)
    return _avalanche(h)


@nb.njit(nogil=True, cache=True)
def digest_range(buf, words, start, end, seed):
    """Version-2 digest of ``buf[start:end]`` (see the module docstring); ``words`` is
    ``buf`` viewed as uint64 (its whole-word prefix) and ``start`` is a multiple of 8.
    ``digest_init`` / ``digest_stripes`` / ``digest_finish`` compute the same digest piece
    by piece, so a decoder can digest what it has just written while it is in cache."""
    sd, lanes, keys = digest_init(seed)
    w, lanes, keys = digest_stripes(words, start // 8, end // 8, lanes, keys)
    return digest_finish(buf, words, start, end, w, sd, lanes)


@nb.njit(nogil=True, cache=True)
def segment_digests(buf, words, counter, out, version):
    """Digest (of ``version``) of each 256 KiB segment of ``buf`` into ``out``; segments are
    taken from a ``run_shared`` counter."""
    n = buf.shape[0]
    while True:
        s = take(counter)
        if s >= out.shape[0]:
            break
        a = s * SEGMENT_BYTES
        b = min(n, a + SEGMENT_BYTES)
        out[s] = (
            digest_range(buf, words, a, b, s)
            if version == 2
            else digest_range_v1(buf, words, a, b, s)
        )


CHECKSUM_VERSION = 2  # the digest new containers use; 1 is still read
CHECKSUM_VERSIONS = (1, 2)


def combine_digests(seg: np.ndarray, total_len: int, version: int = CHECKSUM_VERSION) -> int:
    seg = readonly(np.ascontiguousarray(seg, dtype=np.uint64))
    fn = digest_range if version == 2 else digest_range_v1
    return int(fn(readonly(seg.view(np.uint8)), seg, 0, seg.size * 8, total_len))


def checksum(buf: np.ndarray, threads: int | None = None, version: int = CHECKSUM_VERSION) -> int:
    """mfx64 checksum of a byte view (any contiguous numpy array is viewed as uint8)."""
    if version not in CHECKSUM_VERSIONS:
        raise InputError(f"checksum version {version}; known: {CHECKSUM_VERSIONS}")
    b = readonly(np.ascontiguousarray(buf).reshape(-1).view(np.uint8))
    w = words_view(b)
    nseg = (b.size + SEGMENT_BYTES - 1) // SEGMENT_BYTES
    seg = np.zeros(nseg, np.uint64)
    if nseg:
        run_shared(
            lambda ctr: segment_digests(b, w, ctr, seg, version),
            nseg,
            threads if b.size > (8 << 20) else 1,
        )
    return combine_digests(seg, b.size, version)
