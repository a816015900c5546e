"""TBE codec: ZipServ's fixed-length "tensor-core aware triple bit-plane exponent" format.

ZipServ, TCA-TBE encoding. Per matrix a window of 7 exponents ``[b+1, b+7]`` is chosen; every
weight gets a 3-bit code ``c = e - b`` if its exponent is in the window, else ``c = 0``
(fallback). Codes live in three bit-planes, one 64-bit word per 8x8 tile and plane (bit
``8*row + col`` of the tile). Covered weights store one byte in the sign+mantissa stream;
fallback weights store their full 16 bits in the fallback stream. Cost: 11 bits per covered
bf16 weight and 19 per fallback, ``19 - 8p`` bits with coverage ``p``.

Layout of a tensor as a matrix ``(R, C)``: leading dimensions are flattened (``R = prod
(shape[:-1])``, ``C = shape[-1]``); 0-D and 1-D tensors become rows of 64. The tile grid is
``ceil(R/8) x ceil(C/8)``; tiles are grouped in 64x64 blocks (row-major block grid), and each
block carries prefix offsets into both streams. Inside a block the streams follow row-major
element order, so a block decodes on its own: an element's slot is the block offset plus the
number of covered (or fallback) elements before it in the block. Positions outside the
tensor (padding) get code 0 and store nothing, so padding costs 3 bits, not a value.

fp16 adaptation: an fp16 weight has 11 non-exponent bits. Covered weights store the low
mantissa byte in the byte stream and ``sign, m9, m8`` in three extra bit-planes (planes 3..5),
so covered fp16 costs 14 bits and fallback 22.

Payload (little-endian)::

    u8 dtype_code | u8 planes_per_tile | i16 base | u32 0 | u64 R | u64 C | u64 numel
    | u64 n_covered | u64 n_fallback
    | u64 planes[tiles_r * tiles_c * planes_per_tile]     (tile-major, then plane)
    | i64 cov_off[blocks + 1] | i64 fb_off[blocks + 1]
    | u8 covered_bytes[n_covered] (+1 zero byte if odd) | u16 fallback[n_fallback]
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from moeflow._deps import require
from moeflow.compress.bits import FLOAT_SPECS, readonly
from moeflow.compress.parallel import run_parallel
from moeflow.compress.stats import best_window, exponent_histogram
from moeflow.errors import CorruptDataError, InputError

nb = require("numba", "moeflow.compress")

_HEAD = struct.Struct("<BBhIQQQQQ")
TBE_DTYPES = ("bfloat16", "float16")
ROW_1D = 64  # row length used for 0-D and 1-D tensors


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(R, C)`` matrix a tensor of ``shape`` is stored as."""
    n = int(np.prod(shape)) if len(shape) else 1
    if n and len(shape) >= 2:
        return n // shape[-1], int(shape[-1])
    return (n + ROW_1D - 1) // ROW_1D, ROW_1D


@dataclass
class TBEParts:
    """A parsed TBE payload (numpy views into the payload, no copies)."""

    dtype: str
    base: int
    rows: int
    cols: int
    numel: int
    planes_per_tile: int
    planes: np.ndarray  # uint64 [tiles_r * tiles_c * planes_per_tile]
    cov_off: np.ndarray  # int64 [blocks + 1]
    fb_off: np.ndarray  # int64 [blocks + 1]
    covered: np.ndarray  # uint8 [n_covered]
    fallback: np.ndarray  # uint16 [n_fallback]

    @property
    def tiles(self) -> tuple[int, int]:
        return (self.rows + 7) // 8, (self.cols + 7) // 8

    @property
    def blocks(self) -> tuple[int, int]:
        return (self.rows + 63) // 64, (self.cols + 63) // 64


# ----------------------------------------------------------------------------- kernels
@nb.njit(nogil=True, cache=True)
def _count(vals, R, C, n, shift, emask, base, b_lo, b_hi, cov_cnt, fb_cnt):
    """Covered / fallback counts of blocks ``b_lo..b_hi``."""
    BC = (C + 63) // 64
    for blk in range(b_lo, b_hi):
        br = blk // BC
        bc = blk % BC
        cv = 0
        fb = 0
        for r in range(br * 64, min(R, br * 64 + 64)):
            for c in range(bc * 64, min(C, bc * 64 + 64)):
                k = r * C + c
                if k < n:
                    d = np.int64((vals[k] >> shift) & emask) - base
                    if d >= 1 and d <= 7:
                        cv += 1
                    else:
                        fb += 1
        cov_cnt[blk] = cv
        fb_cnt[blk] = fb


@nb.njit(nogil=True, cache=True)
def _fill(vals, R, C, n, kind, base, b_lo, b_hi, cov_off, fb_off, planes, P, cov, fbs):
    BC = (C + 63) // 64
    TC = (C + 7) // 8
    shift = 7 if kind == 1 else 10
    emask = 0xFF if kind == 1 else 0x1F
    for blk in range(b_lo, b_hi):
        br = blk // BC
        bc = blk % BC
        pc = cov_off[blk]
        pf = fb_off[blk]
        for r in range(br * 64, min(R, br * 64 + 64)):
            tr = r >> 3
            er = r & 7
            for c in range(bc * 64, min(C, bc * 64 + 64)):
                k = r * C + c
                if k >= n:
                    continue
                v = np.uint32(vals[k])
                d = np.int64((v >> shift) & emask) - base
                t = (tr * TC + (c >> 3)) * P
                bit = np.uint64(1) << np.uint64(er * 8 + (c & 7))
                if d >= 1 and d <= 7:
                    if d & 1:
                        planes[t] |= bit
                    if d & 2:
                        planes[t + 1] |= bit
                    if d & 4:
                        planes[t + 2] |= bit
                    if kind == 1:
                        cov[pc] = ((v >> 8) & 0x80) | (v & 0x7F)
                    else:
                        cov[pc] = v & 0xFF
                        x3 = ((v >> 13) & 4) | ((v >> 8) & 3)  # sign, m9, m8
                        if x3 & 1:
                            planes[t + 3] |= bit
                        if x3 & 2:
                            planes[t + 4] |= bit
                        if x3 & 4:
                            planes[t + 5] |= bit
                    pc += 1
                else:
                    fbs[pf] = v
                    pf += 1


@nb.njit(nogil=True, cache=True)
def _decode_blocks(R, C, n, kind, base, b_lo, b_hi, cov_off, fb_off, planes, P, cov, fbs, out):
    """Decode blocks ``b_lo..b_hi``; returns 0 or a negative error code (bounds-checked)."""
    BC = (C + 63) // 64
    TC = (C + 7) // 8
    for blk in range(b_lo, b_hi):
        br = blk // BC
        bc = blk % BC
        pc = cov_off[blk]
        pf = fb_off[blk]
        ec = cov_off[blk + 1]
        ef = fb_off[blk + 1]
        for r in range(br * 64, min(R, br * 64 + 64)):
            tr = r >> 3
            sh0 = (r & 7) * 8
            for c in range(bc * 64, min(C, bc * 64 + 64)):
                k = r * C + c
                if k >= n:
                    continue
                t = (tr * TC + (c >> 3)) * P
                sh = np.uint64(sh0 + (c & 7))
                one = np.uint64(1)
                code = (
                    ((planes[t] >> sh) & one)
                    | (((planes[t + 1] >> sh) & one) << one)
                    | (((planes[t + 2] >> sh) & one) << np.uint64(2))
                )
                if code != 0:
                    if pc >= ec:
                        return -1
                    e = np.uint32(np.int64(code) + base)
                    b = np.uint32(cov[pc])
                    pc += 1
                    if kind == 1:
                        out[k] = ((b & 0x80) << 8) | (e << 7) | (b & 0x7F)
                    else:
                        x3 = (
                            ((planes[t + 3] >> sh) & one)
                            | (((planes[t + 4] >> sh) & one) << one)
                            | (((planes[t + 5] >> sh) & one) << np.uint64(2))
                        )
                        x = np.uint32(x3)
                        out[k] = ((x & 4) << 13) | (e << 10) | ((x & 3) << 8) | b
                else:
                    if pf >= ef:
                        return -2
                    out[k] = fbs[pf]
                    pf += 1
        if pc != ec or pf != ef:
            return -3
    return 0


# ----------------------------------------------------------------------------- API
def encode(bits: np.ndarray, dtype: str, shape: tuple[int, ...], threads: int | None = None):
    """Encode flat raw bits (uint16) of a tensor of ``shape``. Returns the payload (uint8)."""
    if dtype not in TBE_DTYPES:
        raise InputError(f"TBE codec takes {TBE_DTYPES}, not {dtype!r}")
    spec = FLOAT_SPECS[dtype]
    vals = readonly(np.ascontiguousarray(bits).reshape(-1))
    n = vals.size
    R, C = matrix_shape(tuple(shape))
    kind = 1 if dtype == "bfloat16" else 2
    P = 3 if kind == 1 else 6
    hist = exponent_histogram(vals, spec)
    base, _ = best_window(hist)
    TR, TC = (R + 7) // 8, (C + 7) // 8
    BR, BC = (R + 63) // 64, (C + 63) // 64
    nb_ = BR * BC
    cov_cnt = np.zeros(nb_, np.int64)
    fb_cnt = np.zeros(nb_, np.int64)
    emask = (1 << spec.exp_bits) - 1
    run_parallel(
        lambda lo, hi: _count(vals, R, C, n, spec.man_bits, emask, base, lo, hi, cov_cnt, fb_cnt),
        nb_,
        threads,
    )
    cov_off = np.zeros(nb_ + 1, np.int64)
    fb_off = np.zeros(nb_ + 1, np.int64)
    np.cumsum(cov_cnt, out=cov_off[1:])
    np.cumsum(fb_cnt, out=fb_off[1:])
    cov_off, fb_off = readonly(cov_off), readonly(fb_off)
    n_cov, n_fb = int(cov_off[-1]), int(fb_off[-1])
    head = _HEAD.pack(spec.code, P, base, 0, R, C, n, n_cov, n_fb)
    sizes = [len(head), TR * TC * P * 8, (nb_ + 1) * 16, n_cov + (n_cov & 1), 2 * n_fb]
    out = np.zeros(sum(sizes), np.uint8)
    at = np.cumsum([0] + sizes)
    out[: at[1]] = np.frombuffer(head, np.uint8)
    planes = out[at[1] : at[2]].view(np.uint64)
    out[at[2] : at[3]] = np.concatenate([cov_off, fb_off]).view(np.uint8)
    cov = out[at[3] : at[3] + n_cov]
    fbs = out[at[4] : at[5]].view(np.uint16)
    run_parallel(
        lambda lo, hi: _fill(
            vals, R, C, n, kind, base, lo, hi, cov_off, fb_off, planes, P, cov, fbs
        ),
        nb_,
        threads,
    )
    return out


def parse(payload, dtype: str | None = None, shape: tuple[int, ...] | None = None) -> TBEParts:
    """Parse and validate a TBE payload; raises CorruptDataError on any inconsistency."""
    buf = payload if isinstance(payload, np.ndarray) else np.frombuffer(payload, np.uint8)
    if buf.size < _HEAD.size:
        raise CorruptDataError(f"TBE payload of {buf.size} bytes is shorter than its header")
    code, P, base, zero, R, C, n, n_cov, n_fb = _HEAD.unpack_from(buf, 0)
    names = {FLOAT_SPECS[d].code: d for d in TBE_DTYPES}
    if code not in names or zero != 0:
        raise CorruptDataError(f"TBE payload has dtype code {code}")
    name = names[code]
    spec = FLOAT_SPECS[name]
    if P != (3 if name == "bfloat16" else 6) or not -1 <= base <= (1 << spec.exp_bits) - 8:
        raise CorruptDataError(f"TBE payload has {P} planes per tile and window base {base}")
    if dtype is not None and name != dtype:
        raise CorruptDataError(f"TBE payload holds {name}; the container says {dtype}")
    if shape is not None:
        numel = int(np.prod(shape)) if len(shape) else 1
        if (R, C) != matrix_shape(tuple(shape)) or n != numel:
            raise CorruptDataError(
                f"TBE payload is a {R}x{C} matrix of {n} values; the "
                f"container says shape {tuple(shape)}"
            )
    if C == 0 or R > (1 << 40) or C > (1 << 40) or n > R * C or n_cov + n_fb != n:
        raise CorruptDataError(
            f"TBE payload header is inconsistent: R={R} C={C} n={n} covered={n_cov} fallback={n_fb}"
        )
    TR, TC = (R + 7) // 8, (C + 7) // 8
    nb_ = ((R + 63) // 64) * ((C + 63) // 64)
    sizes = [_HEAD.size, TR * TC * P * 8, (nb_ + 1) * 16, n_cov + (n_cov & 1), 2 * n_fb]
    if sum(sizes) != buf.size:
        raise CorruptDataError(f"TBE payload is {buf.size} bytes; its header implies {sum(sizes)}")
    at = np.cumsum([0] + sizes)
    offs = buf[at[2] : at[3]].view(np.int64)
    cov_off, fb_off = offs[: nb_ + 1], offs[nb_ + 1 :]
    for name_, off, total in (("covered", cov_off, n_cov), ("fallback", fb_off, n_fb)):
        if (
            off[0] != 0
            or off[-1] != total
            or np.any(np.diff(off) < 0)
            or np.any(np.diff(off) > 4096)
        ):
            raise CorruptDataError(
                f"TBE {name_} block offsets are not a prefix sum of "
                f"per-block counts ending at {total}"
            )
    return TBEParts(
        dtype=name,
        base=base,
        rows=R,
        cols=C,
        numel=n,
        planes_per_tile=P,
        planes=readonly(buf[at[1] : at[2]].view(np.uint64)),
        cov_off=readonly(cov_off),
        fb_off=readonly(fb_off),
        covered=readonly(buf[at[3] : at[3] + n_cov]),
        fallback=readonly(buf[at[4] : at[5]].view(np.uint16)),
    )


def decode_parts(parts: TBEParts, threads: int | None = None) -> np.ndarray:
    """Dense flat raw bits (uint16, original element order) of a parsed payload."""
    out = np.empty(parts.numel, np.uint16)
    kind = 1 if parts.dtype == "bfloat16" else 2
    nb_ = parts.cov_off.size - 1
    errs = (
        run_parallel(
            lambda lo, hi: _decode_blocks(
                parts.rows,
                parts.cols,
                parts.numel,
                kind,
                parts.base,
                lo,
                hi,
                parts.cov_off,
                parts.fb_off,
                parts.planes,
                parts.planes_per_tile,
                parts.covered,
                parts.fallback,
                out,
            ),
            nb_,
            threads,
        )
        if nb_
        else [0]
    )
    bad = [e for e in errs if e != 0]
    if bad:
        raise CorruptDataError(
            f"TBE block stream counts disagree with its bit-planes (error {bad[0]})"
        )
    return out


def decode(payload, dtype: str, shape: tuple[int, ...], threads: int | None = None):
    return decode_parts(parse(payload, dtype, shape), threads)
