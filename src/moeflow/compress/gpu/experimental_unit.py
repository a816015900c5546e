"""EXPERIMENTAL tile-row ("unit") Triton kernels for TBE: decode and fused decompress-GEMM.

Status: experimental and unmeasured. These kernels have never run on a GPU; they are checked
bit-exact under ``TRITON_INTERPRET=1`` and compiled for sm_90 (where they take about 22
instructions per decoded weight in static SASS counts, the fewest of the variants tried).
Nothing public imports this module: :func:`moeflow.compress.gpu.tbe_decode` (block kernel)
and :func:`moeflow.compress.gpu.tbe_linear` (slab kernel) are the measured path.

How to measure: ``bash benchmarks/gpu/run_all.sh`` on a GPU runs
``benchmarks/gpu/tbe_experimental_gpu.py``, which checks every configuration here (bit-exact
decode on fallback-heavy bf16 and fp16 weights; GEMM within bf16 rounding of an fp32
reference) and times it beside the public kernels and ``torch.matmul`` on the weight shapes
of issue 5 (4096x4096 to 28672x8192, 1-128 tokens).

When to promote or delete: if a configuration decodes faster than the block kernel
(0.33-0.35 TB/s on an H200) or multiplies faster than the slab kernel (3.3 ms on 28672x8192)
on those shapes, with every check passing, it replaces that kernel in ``decode.py`` /
``linear.py`` (matrices this module cannot take, see ``supported``, keep the old kernel or
get padded) and this module goes. If neither wins, delete this module and its benchmark and
tests (git keeps them).

Format: ZipServ's TBE (see :mod:`moeflow.compress.tbe`); this module spends as few
instructions per weight as it can. The unit of work is one *tile row*: the 8 consecutive
weights of row ``r`` inside tile ``(r // 8, t)``. Its three code bits per weight are byte
``r % 8`` of the tile's three plane words, so a unit reads 3 bytes of planes, and its covered
weights are consecutive in the covered-byte stream (the streams follow row-major order inside
a 64x64 block, and a unit is 8 adjacent columns of one row).

Per unit (amortized over 8 weights):

- ``m = b0 | b1 | b2`` is the covered mask; ``popc(m)`` and ``8 - popc(m)`` are its stream
  counts. The stream slots of a unit come from a scan: in ``layout="rows"`` (one thread per
  matrix row) a thread walks its row's units in order and one scan over the block's row
  totals adds up; ``layout="units"`` scans ``[rows, 8]`` units of a slab.
- The unit's covered bytes (at most 8) and first 4 fallback values are loaded as aligned
  int32 words and funnel-shifted into two registers each (``CA:CB``, ``FA:FB``); the device
  streams carry zero padding for this (``matrix.COV_PAD`` / ``FB_PAD``).
- One 16-byte table row, indexed by ``m``, holds a ``prmt`` selector byte per weight: for
  covered weight j with rank r (covered weights before it), nibbles ``(r, r | 8)`` pick its
  byte from ``CA:CB`` and replicate its sign into the next byte; for a fallback weight with
  f fallbacks before it, nibbles ``(2f, 2f + 1)`` pick its 16 bits from ``FA:FB``.
- Three 8-byte table rows, indexed by the plane bytes, add up to one biased exponent per
  byte (plane p's bit j sits at bit 8j + p; the window base is folded into plane 0's).

Per weight ``j`` (unrolled, so every shift is a constant): one ``prmt`` each for the covered
byte ``s`` and the fallback value, ``bits = (s & 0x807F) | (exponent byte << 7)`` (bf16), and
a select on bit j of ``m``. Units with more than 4 fallbacks load the rest one by one (a
branch taken only when some unit of the program needs it).

Weights are packed two per int32 and stored 16 bytes per unit. The layout needs every tile
row to be entirely inside or entirely outside the matrix: ``supported(m)`` says when (2-D
weights whose last dimension is a multiple of 8, under 2**31 elements). Under
``TRITON_INTERPRET=1`` the ``prmt`` and ``popc`` instructions are emulated with integer ops
(``HW=False``).
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from moeflow._deps import require
from moeflow.compress.gpu import matrix
from moeflow.compress.gpu.matrix import TBEMatrix, interpreted, skinny_input
from moeflow.errors import ConfigError, InputError

triton = require("triton", "moeflow.compress.gpu.experimental_unit")
import triton.language as tl  # noqa: E402  (after the ImportError that names the extra)

SLAB_ROWS = (16, 32, 64)


def supported(m: TBEMatrix) -> bool:
    """True when the unit kernels handle ``m`` (see the module docstring)."""
    return (
        m.cols % 8 == 0
        and m.numel == m.rows * m.cols
        and m.numel < 2**31
        and m.planes.numel() < 2**31
    )


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _popc_swar(x):
    """Set bits of each int32 with the SWAR sequence on uint32 (runs in the interpreter)."""
    u = x.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32, bitcast=True)


@triton.jit
def _popc_hw(x, HW: tl.constexpr):
    """Set bits of each int32: the hardware instruction on NVIDIA (HW), else the SWAR sequence
    (the interpreter has no inline assembly). LLVM does not always recognise the SWAR idiom
    once the operand is known to be narrow, so the GPU path names the instruction."""
    if HW:
        return tl.inline_asm_elementwise(
            "popc.b32 $0, $1;", "=r,r", [x], dtype=tl.int32, is_pure=True, pack=1
        )
    else:
        return _popc_swar(x)


@triton.jit
def _pick(a, b, nib):
    """Byte ``nib & 7`` of the 8 bytes ``b:a``, sign-replicated when ``nib & 8`` (one PRMT
    selector nibble)."""
    src = tl.where((nib & 4) != 0, b, a)
    byte = (src >> ((nib & 3) * 8)) & 0xFF
    return tl.where((nib & 8) != 0, tl.where((byte & 0x80) != 0, 0xFF, 0), byte)


@triton.jit
def _prmt(a, b, sel, HW: tl.constexpr):
    """PTX ``prmt.b32`` (default mode) of ``a``, ``b`` and selector ``sel``; only the low two
    result bytes are used here, so the interpreter path computes just those."""
    if HW:
        return tl.inline_asm_elementwise(
            "prmt.b32 $0, $1, $2, $3;",
            "=r,r,r,r",
            [a, b, sel],
            dtype=tl.int32,
            is_pure=True,
            pack=1,
        )
    else:
        return _pick(a, b, sel & 0xF) | (_pick(a, b, (sel >> 4) & 0xF) << 8)


@triton.jit
def _funnel(lo, hi, sh):
    """32 bits of ``hi:lo`` starting at bit ``sh`` (0 <= sh < 32)."""
    w = (hi.to(tl.uint32).to(tl.uint64) << 32) | lo.to(tl.uint32).to(tl.uint64)
    return (w >> sh.to(tl.uint64)).to(tl.uint32).to(tl.int32, bitcast=True)


@triton.jit
def _eight_bytes(ptr32, slot, LOG: tl.constexpr, BITS: tl.constexpr):
    """The 8 bytes from stream slot ``slot`` on (``2**LOG`` slots of ``BITS`` bits per int32
    word), as two int32: three aligned word loads, funnel-shifted."""
    w = slot >> LOG
    sh = (slot & ((1 << LOG) - 1)) * BITS
    x0 = tl.load(ptr32 + w)
    x1 = tl.load(ptr32 + w + 1)
    x2 = tl.load(ptr32 + w + 2)
    return _funnel(x0, x1, sh), _funnel(x1, x2, sh)


@triton.jit
def _spread(b0, b1, b2, SH: tl.constexpr):
    """Codes of weights SH..SH+3 of a unit, one per byte (3 bits each), from plane bytes:
    ``x * 0x204081`` copies bit j of a nibble to bit 8j (the other copies miss the mask)."""
    x0 = ((b0 >> SH) & 0xF) * 0x204081
    x1 = ((b1 >> SH) & 0xF) * 0x408102
    x2 = ((b2 >> SH) & 0xF) * 0x810204
    return (x0 & 0x01010101) | (x1 & 0x02020202) | (x2 & 0x04040404)


@triton.jit
def _byte_at7(E, J: tl.constexpr):
    """E shifted so that its byte J starts at bit 7 (other bits are left as they fall)."""
    if J == 0:
        return E << 7
    else:
        return E >> (8 * J - 7)


@triton.jit
def _nib(Q, J: tl.constexpr):
    """Q shifted so that its byte J is the low byte (a PRMT selector for weight J)."""
    if J == 0:
        return Q
    else:
        return Q >> (8 * J)


@triton.jit
def _plane_bytes(planes, widx, sh, ok, P: tl.constexpr, IS_BF16: tl.constexpr):
    """Byte ``sh / 8`` of the int32 halves ``widx`` of a unit's plane words (zero where not
    ``ok``): planes 0-2, and 3-5 for fp16 (zeros for bf16)."""
    b0 = (tl.load(planes + widx, mask=ok, other=0) >> sh) & 0xFF
    b1 = (tl.load(planes + widx + 2, mask=ok, other=0) >> sh) & 0xFF
    b2 = (tl.load(planes + widx + 4, mask=ok, other=0) >> sh) & 0xFF
    if IS_BF16:
        b3 = b0 * 0
        b4 = b3
        b5 = b3
    else:
        b3 = (tl.load(planes + widx + 6, mask=ok, other=0) >> sh) & 0xFF
        b4 = (tl.load(planes + widx + 8, mask=ok, other=0) >> sh) & 0xFF
        b5 = (tl.load(planes + widx + 10, mask=ok, other=0) >> sh) & 0xFF
    return b0, b1, b2, b3, b4, b5


@triton.jit
def _load4(ptr, idx):
    """``ptr[4 idx + q]`` for q = 0..3 as four tensors shaped like ``idx`` (2-D; one 16-byte
    load per element)."""
    q = tl.arange(0, 4)[None, None, :]
    v = tl.load(ptr + (tl.multiple_of(idx * 4, [4, 4])[:, :, None] + q))
    a, b = tl.split(tl.reshape(v, [idx.shape[0], idx.shape[1], 2, 2]))
    a0, a1 = tl.split(a)
    b0, b1 = tl.split(b)
    return a0, b0, a1, b1


@triton.jit
def _load2(ptr, idx):
    """``ptr[2 idx + q]`` for q = 0, 1 as two tensors shaped like ``idx`` (2-D)."""
    q = tl.arange(0, 2)[None, None, :]
    v = tl.load(ptr + (tl.multiple_of(idx * 2, [2, 2])[:, :, None] + q))
    return tl.split(v)


@triton.jit
def _unit_words(
    b0,
    b1,
    b2,
    b3,
    b4,
    b5,
    cu,
    fu,
    ok,
    slow,
    cov32,
    fb32,
    fb_ptr,
    tab,
    IS_BF16: tl.constexpr,
    HW: tl.constexpr,
    NEG: tl.constexpr,
):
    """The 8 weights of each unit as four int32 words (two bit patterns each, low half
    first), given its plane bytes and its first covered / fallback slots ``cu`` / ``fu``.
    ``slow`` (a scalar) says that some unit has more than 4 fallbacks. ``tab`` holds the
    selector and spread tables (``_tables``)."""
    cm = b0 | b1 | b2
    # PRMT selectors, one byte per weight (table row cm): covered byte number r = rank of
    # the weight among the unit's covered ones, nibbles (r, r | 8) = the byte and its sign
    # replicated; fallback value number f = (weights before) - r, nibbles (2f, 2f + 1)
    Q0, Q1, F0, F1 = _load4(tab, cm)
    # biased exponents, one byte per weight: the sum of the three planes' spread tables
    # (plane p's bit j moved to bit 8j + p; the window base is folded into plane 0's)
    s00, s01 = _load2(tab + 1024, b0)
    s10, s11 = _load2(tab + 1536, b1)
    s20, s21 = _load2(tab + 2048, b2)
    E0 = s00 + s10 + s20
    E1 = s01 + s11 + s21
    if NEG:  # window base -1: the tables hold base + 1; covered weights take the 1 back
        E0 -= ((cm & 0xF) * 0x204081) & 0x01010101
        E1 -= (((cm >> 4) & 0xF) * 0x204081) & 0x01010101
    # the unit's covered bytes (at most 8) and first 4 fallback values, as aligned words
    CA, CB = _eight_bytes(cov32, cu, 2, 8)  # covered bytes: 4 per word
    FA, FB = _eight_bytes(fb32, fu, 1, 16)  # fallback values: 2 per word
    if not IS_BF16:  # planes 3..5: sign, m9, m8 of covered fp16 weights
        X0 = _spread(b3, b4, b5, 0)
        X1 = _spread(b3, b4, b5, 4)
    prev = cm
    w0 = cm
    w1 = cm
    w2 = cm
    w3 = cm
    for i in tl.static_range(8):
        if i < 4:
            s = _prmt(CA, CB, _nib(Q0, i % 4), HW)
            fv = _prmt(FA, FB, _nib(F0, i % 4), HW)
            Es = _byte_at7(E0, i % 4)
        else:
            s = _prmt(CA, CB, _nib(Q1, i % 4), HW)
            fv = _prmt(FA, FB, _nib(F1, i % 4), HW)
            Es = _byte_at7(E1, i % 4)
        if IS_BF16:
            # sign from the replicated byte, mantissa from the byte, exponent from E
            cb = (s & 0x807F) | (Es & ~0x807F)
        else:
            if i < 4:
                x3 = (_byte_at7(X0, i % 4) >> 7) & 7
            else:
                x3 = (_byte_at7(X1, i % 4) >> 7) & 7
            cb = ((x3 & 4) << 13) | ((Es << 3) & 0x7C00) | ((x3 & 3) << 8) | (s & 0xFF)
        v = tl.where((cm & (1 << i)) != 0, cb, fv)
        if i % 2 == 0:
            prev = v
        else:
            word = (prev & 0xFFFF) | (v << 16)
            if i == 1:
                w0 = word
            elif i == 3:
                w1 = word
            elif i == 5:
                w2 = word
            else:
                w3 = word
    if slow:  # some unit has more than 4 fallbacks: load those past the 4th one by one
        for i in tl.static_range(8):
            if i < 4:
                rank = (Q0 >> (8 * (i % 4))) & 0xF
            else:
                rank = (Q1 >> (8 * (i % 4))) & 0xF
            far = ok & ((cm & (1 << i)) == 0) & (i - rank >= 4)
            val = tl.load(fb_ptr + (fu + i - rank), mask=far, other=0).to(tl.int32) & 0xFFFF
            if i % 2 == 0:
                keep = -65536  # 0xFFFF0000: the odd weight's half stays
            else:
                keep = 0xFFFF
            if i // 2 == 0:
                w0 = tl.where(far, (w0 & keep) | (val << (16 * (i % 2))), w0)
            elif i // 2 == 1:
                w1 = tl.where(far, (w1 & keep) | (val << (16 * (i % 2))), w1)
            elif i // 2 == 2:
                w2 = tl.where(far, (w2 & keep) | (val << (16 * (i % 2))), w2)
            else:
                w3 = tl.where(far, (w3 & keep) | (val << (16 * (i % 2))), w3)
    return w0, w1, w2, w3


@triton.jit
def _store_units(out32, idx, w0, w1, w2, w3, ok):
    """Store each unit's four words (16 bytes) at int32 index ``idx`` (2-D, multiples of 4)."""
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [a, b, 2, 2] = w0, w1, w2, w3
    words = tl.reshape(words, [idx.shape[0], idx.shape[1], 4])
    q = tl.arange(0, 4)[None, None, :]
    tl.store(out32 + (tl.multiple_of(idx, [4, 4])[:, :, None] + q), words, mask=ok[:, :, None])


@triton.jit
def decode_units_kernel(
    planes,
    cov32,
    fb32,
    fb_ptr,
    cov_off,
    fb_off,
    out32,
    R,
    C,
    TC,
    BC,
    tab,
    SR: tl.constexpr,
    P: tl.constexpr,
    IS_BF16: tl.constexpr,
    HW: tl.constexpr,
    NEG: tl.constexpr,
):
    """One program per 64x64 block, as ``64 / SR`` slabs of ``[SR, 8]`` units (row, tile
    column); the slots of a unit come from a scan over the slab."""
    br = tl.program_id(0)
    bc = tl.program_id(1)
    blk = br * BC + bc
    c_run = tl.load(cov_off + blk).to(tl.int32)
    f_run = tl.load(fb_off + blk).to(tl.int32)
    tt = tl.arange(0, 8)[None, :]
    tc = bc * 8 + tt
    for j in tl.static_range(64 // SR):
        row = br * 64 + j * SR + tl.arange(0, SR)[:, None]
        ok = (row < R) & (tc < TC)
        # byte r%8 of a plane word = byte r%4 of its int32 half (r%8)//4; loading the half
        # keeps the loads from looking contiguous along rows, so Triton keeps one layout
        widx = ((row // 8) * TC + tc) * (2 * P) + (row % 8) // 4
        b0, b1, b2, b3, b4, b5 = _plane_bytes(planes, widx, (row % 4) * 8, ok, P, IS_BF16)
        ncov = _popc_hw(b0 | b1 | b2, HW)
        nfb = tl.where(ok, 8, 0) - ncov
        cnt = ncov | (nfb << 16)  # covered | fallback << 16
        row_tot = tl.sum(cnt, axis=1, keep_dims=True)
        excl = (tl.cumsum(row_tot, axis=0) - row_tot) + (tl.cumsum(cnt, axis=1) - cnt)
        slow = tl.max(nfb) > 4
        w0, w1, w2, w3 = _unit_words(
            b0,
            b1,
            b2,
            b3,
            b4,
            b5,
            c_run + (excl & 0xFFFF),
            f_run + (excl >> 16),
            ok,
            slow,
            cov32,
            fb32,
            fb_ptr,
            tab,
            IS_BF16,
            HW,
            NEG,
        )
        tot = tl.sum(row_tot)
        c_run += tot & 0xFFFF
        f_run += tot >> 16
        _store_units(out32, (row * C + tc * 8) // 2, w0, w1, w2, w3, ok)


@triton.jit
def _row_starts(
    planes,
    cov_off,
    fb_off,
    br,
    bok,
    row,
    rok,
    bc,
    BC,
    TC,
    wrow,
    sh,
    P: tl.constexpr,
    IS_BF16: tl.constexpr,
    HW: tl.constexpr,
):
    """Stream slots of the first unit of each row (``[RB, 64]``: block row, row in block) in
    block column ``bc``, and whether some unit there has more than 4 fallbacks. The counts of
    a row's units come from its plane bytes; one scan over the rows of each block adds up."""
    blk = br * BC + bc
    c0 = tl.load(cov_off + blk, mask=bok, other=0).to(tl.int32)
    f0 = tl.load(fb_off + blk, mask=bok, other=0).to(tl.int32)
    tot = row * 0
    most = row * 0  # most fallbacks in a unit
    for t in range(8):
        tc = bc * 8 + t
        ok = rok & ((row * 0 + tc) < TC)
        b0, b1, b2, b3, b4, b5 = _plane_bytes(planes, wrow + tc * (2 * P), sh, ok, P, IS_BF16)
        ncov = _popc_hw(b0 | b1 | b2, HW)
        nfb = tl.where(ok, 8, 0) - ncov
        tot += ncov | (nfb << 16)
        most = tl.maximum(most, nfb)
    excl = tl.cumsum(tot, axis=1) - tot
    slow = tl.max(tl.max(most, axis=1)) > 4
    return c0 + (excl & 0xFFFF), f0 + (excl >> 16), slow


@triton.jit
def _row_frame(pid, R, TC, RB: tl.constexpr, P: tl.constexpr):
    """A program's ``RB`` block rows ``br`` ([RB, 1]) and rows ``row`` ([RB, 64], one per
    thread), the in-matrix masks of both, and each row's plane-word index and byte shift."""
    br = pid * RB + tl.arange(0, RB)[:, None]
    row = br * 64 + tl.arange(0, 64)[None, :]
    wrow = (row // 8) * TC * (2 * P) + (row % 8) // 4
    return br, row, row < R, br * 64 < R, wrow, (row % 4) * 8


@triton.jit
def _next_unit(
    planes,
    wrow,
    tc,
    sh,
    ok,
    run_c,
    run_f,
    slow,
    cov32,
    fb32,
    fb_ptr,
    tab,
    P: tl.constexpr,
    IS_BF16: tl.constexpr,
    HW: tl.constexpr,
    NEG: tl.constexpr,
):
    """Decode each row's unit in tile column ``tc`` at its running stream slots; returns the
    unit's four words and the slots of the row's next unit."""
    b0, b1, b2, b3, b4, b5 = _plane_bytes(planes, wrow + tc * (2 * P), sh, ok, P, IS_BF16)
    ncov = _popc_hw(b0 | b1 | b2, HW)
    w0, w1, w2, w3 = _unit_words(
        b0, b1, b2, b3, b4, b5, run_c, run_f, ok, slow, cov32, fb32, fb_ptr, tab, IS_BF16, HW, NEG
    )
    return w0, w1, w2, w3, run_c + ncov, run_f + tl.where(ok, 8, 0) - ncov


@triton.jit
def decode_rows_kernel(
    planes,
    cov32,
    fb32,
    fb_ptr,
    cov_off,
    fb_off,
    out32,
    R,
    C,
    TC,
    BC,
    tab,
    RB: tl.constexpr,
    P: tl.constexpr,
    IS_BF16: tl.constexpr,
    HW: tl.constexpr,
    NEG: tl.constexpr,
):
    """One thread per matrix row: a program owns ``RB`` block rows (``64 * RB`` rows) of one
    block column, and each thread walks the 8 units of its row in order, so the slots of a
    unit are the thread's running counts plus one scan over the block's row totals."""
    pid = tl.program_id(0)
    bc = tl.program_id(1)
    br, row, rok, bok, wrow, sh = _row_frame(pid, R, TC, RB, P)
    run_c, run_f, slow = _row_starts(
        planes, cov_off, fb_off, br, bok, row, rok, bc, BC, TC, wrow, sh, P, IS_BF16, HW
    )
    # decode the units in order (the plane loads hit L1)
    for t in range(8):
        tc = bc * 8 + t
        ok = rok & ((row * 0 + tc) < TC)
        w0, w1, w2, w3, run_c, run_f = _next_unit(
            planes,
            wrow,
            tc,
            sh,
            ok,
            run_c,
            run_f,
            slow,
            cov32,
            fb32,
            fb_ptr,
            tab,
            P,
            IS_BF16,
            HW,
            NEG,
        )
        _store_units(out32, (row * C + tc * 8) // 2, w0, w1, w2, w3, ok)


@triton.jit
def _as_f32(w, HI: tl.constexpr, IS_BF16: tl.constexpr):
    """The low (or high, HI) 16-bit pattern of each int32 as fp32."""
    if IS_BF16:  # a bf16 pattern is the top half of the fp32 with the same value
        if HI:
            return (w & -65536).to(tl.float32, bitcast=True)
        else:
            return (w << 16).to(tl.float32, bitcast=True)
    else:
        if HI:
            h = (w >> 16).to(tl.int16)
        else:
            h = w.to(tl.int16)
        return h.to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def linear_rows_kernel(
    x_ptr,
    planes,
    cov32,
    fb32,
    fb_ptr,
    cov_off,
    fb_off,
    tab,
    y_ptr,
    N,
    R,
    C,
    TC,
    BC,
    stride_xn,
    stride_ys,
    stride_yn,
    blocks_per_split,
    RB: tl.constexpr,
    BN: tl.constexpr,
    P: tl.constexpr,
    IS_BF16: tl.constexpr,
    HW: tl.constexpr,
    NEG: tl.constexpr,
):
    """``y[split, n, r] = sum_k x[n, k] W[r, k]`` over this split's block columns, one thread
    per row r of W, multiplying on CUDA cores as it decodes (the weights stay in registers).

    The accumulator is ``[BN, RB, 64, 8]`` (token, block row, row, weight in unit), so each
    decoded weight costs one FMA per token and each token's 8 inputs of a unit come in one
    16-byte load shared by all threads; the 8 lanes are summed once at the end."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    br, row, rok, bok, wrow, sh = _row_frame(pid, R, TC, RB, P)
    nn2 = tl.arange(0, BN)[:, None]
    ii2 = tl.arange(0, 8)[None, :]
    acc0 = tl.zeros((BN, RB, 64), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    acc4 = acc0
    acc5 = acc0
    acc6 = acc0
    acc7 = acc0
    b_lo = split * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, BC)
    for bc in range(b_lo, b_hi):
        run_c, run_f, slow = _row_starts(
            planes, cov_off, fb_off, br, bok, row, rok, bc, BC, TC, wrow, sh, P, IS_BF16, HW
        )
        for t in range(8):
            tc = bc * 8 + t
            if tc < TC:  # units past the last column hold no weights
                w0, w1, w2, w3, run_c, run_f = _next_unit(
                    planes,
                    wrow,
                    tc,
                    sh,
                    rok,
                    run_c,
                    run_f,
                    slow,
                    cov32,
                    fb32,
                    fb_ptr,
                    tab,
                    P,
                    IS_BF16,
                    HW,
                    NEG,
                )
                # the unit's 8 inputs of each token (one 16-byte load), split into 8 [BN, 1, 1]
                xt = tl.load(x_ptr + nn2 * stride_xn + tc * 8 + ii2, mask=nn2 < N, other=0.0)
                xt = tl.reshape(xt.to(tl.float32), [BN, 2, 2, 2])
                xa, xb = tl.split(xt)  # i = 4a + 2b + c: split c, then b, then a
                xaa, xab = tl.split(xa)
                xba, xbb = tl.split(xb)
                x0, x4 = tl.split(xaa)
                x2, x6 = tl.split(xab)
                x1, x5 = tl.split(xba)
                x3, x7 = tl.split(xbb)
                acc0 += x0[:, None, None] * _as_f32(w0, False, IS_BF16)[None, :, :]
                acc1 += x1[:, None, None] * _as_f32(w0, True, IS_BF16)[None, :, :]
                acc2 += x2[:, None, None] * _as_f32(w1, False, IS_BF16)[None, :, :]
                acc3 += x3[:, None, None] * _as_f32(w1, True, IS_BF16)[None, :, :]
                acc4 += x4[:, None, None] * _as_f32(w2, False, IS_BF16)[None, :, :]
                acc5 += x5[:, None, None] * _as_f32(w2, True, IS_BF16)[None, :, :]
                acc6 += x6[:, None, None] * _as_f32(w3, False, IS_BF16)[None, :, :]
                acc7 += x7[:, None, None] * _as_f32(w3, True, IS_BF16)[None, :, :]
    y = ((acc0 + acc1) + (acc2 + acc3)) + ((acc4 + acc5) + (acc6 + acc7))  # [BN, RB, 64]
    nn3 = tl.arange(0, BN)[:, None, None]
    rr = row[None, :, :]
    tl.store(y_ptr + split * stride_ys + nn3 * stride_yn + rr, y, mask=(nn3 < N) & (rr < R))


@triton.jit
def _half(w, HI: tl.constexpr, DT: tl.constexpr):
    """The low (or high, HI) 16-bit pattern of each int32 as a ``DT`` (bf16/fp16) value."""
    if HI:
        h = (w >> 16).to(tl.int16)
    else:
        h = w.to(tl.int16)
    return h.to(DT, bitcast=True)


@triton.jit
def linear_dot_kernel(
    x_ptr,
    planes,
    cov32,
    fb32,
    fb_ptr,
    cov_off,
    fb_off,
    tab,
    y_ptr,
    N,
    R,
    C,
    TC,
    BC,
    stride_xn,
    stride_ys,
    stride_yn,
    blocks_per_split,
    RB: tl.constexpr,
    BN: tl.constexpr,
    P: tl.constexpr,
    IS_BF16: tl.constexpr,
    HW: tl.constexpr,
    NEG: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    """``y[split, n, r] = sum_k x[n, k] W[r, k]`` on tensor cores: each pair of tile rows
    (16 columns of W) is decoded as in ``linear_rows_kernel``, assembled into a
    ``[64 * RB, 16]`` tile in registers and fed to ``tl.dot`` (Triton moves it into the MMA
    operand layout through shared memory); the weights never touch global memory."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    br, row, rok, bok, wrow, sh = _row_frame(pid, R, TC, RB, P)
    DT: tl.constexpr = tl.bfloat16 if IS_BF16 else tl.float16
    nn = tl.arange(0, BN)[:, None]
    kk = tl.arange(0, 16)[None, :]
    acc = tl.zeros((BN, RB * 64), dtype=tl.float32)
    b_lo = split * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, BC)
    for bc in range(b_lo, b_hi):
        run_c, run_f, slow = _row_starts(
            planes, cov_off, fb_off, br, bok, row, rok, bc, BC, TC, wrow, sh, P, IS_BF16, HW
        )
        for tp in range(4):
            ta = bc * 8 + 2 * tp
            if ta < TC:
                a0, a1, a2, a3, run_c, run_f = _next_unit(
                    planes,
                    wrow,
                    ta,
                    sh,
                    rok,
                    run_c,
                    run_f,
                    slow,
                    cov32,
                    fb32,
                    fb_ptr,
                    tab,
                    P,
                    IS_BF16,
                    HW,
                    NEG,
                )
                c0 = a0 * 0
                c1 = c0
                c2 = c0
                c3 = c0
                if ta + 1 < TC:
                    c0, c1, c2, c3, run_c, run_f = _next_unit(
                        planes,
                        wrow,
                        ta + 1,
                        sh,
                        rok,
                        run_c,
                        run_f,
                        slow,
                        cov32,
                        fb32,
                        fb_ptr,
                        tab,
                        P,
                        IS_BF16,
                        HW,
                        NEG,
                    )
                # [RB, 64, 2 (unit), 8 (weight)] -> [64 RB, 16]: column t * 8 + i, i = 4a+2b+c
                p0 = tl.join(_half(a0, False, DT), _half(c0, False, DT))
                p1 = tl.join(_half(a0, True, DT), _half(c0, True, DT))
                p2 = tl.join(_half(a1, False, DT), _half(c1, False, DT))
                p3 = tl.join(_half(a1, True, DT), _half(c1, True, DT))
                p4 = tl.join(_half(a2, False, DT), _half(c2, False, DT))
                p5 = tl.join(_half(a2, True, DT), _half(c2, True, DT))
                p6 = tl.join(_half(a3, False, DT), _half(c3, False, DT))
                p7 = tl.join(_half(a3, True, DT), _half(c3, True, DT))
                wt = tl.join(
                    tl.join(tl.join(p0, p4), tl.join(p2, p6)),
                    tl.join(tl.join(p1, p5), tl.join(p3, p7)),
                )
                wt = tl.reshape(wt, [RB * 64, 16])
                k = ta * 8 + kk
                xt = tl.load(x_ptr + nn * stride_xn + k, mask=(nn < N) & (k < C), other=0.0)
                if DOT_F32:  # Triton's CPU interpreter gets bf16 tl.dot wrong; exact in fp32
                    acc += tl.dot(xt.to(tl.float32), tl.trans(wt.to(tl.float32)))
                else:
                    acc += tl.dot(xt, tl.trans(wt))
    rr = pid * RB * 64 + tl.arange(0, RB * 64)[None, :]
    tl.store(y_ptr + split * stride_ys + nn * stride_yn + rr, acc, mask=(nn < N) & (rr < R))


# ----------------------------------------------------------------------------- host API
LAYOUTS = ("rows", "units")


def _check_matrix(m: TBEMatrix, block_rows: int) -> None:
    if not isinstance(m, TBEMatrix):
        raise InputError(f"expected a TBEMatrix, got {type(m).__name__}")
    if block_rows not in (1, 2, 4):
        raise ConfigError("block_rows", block_rows, "1, 2 or 4")
    if not supported(m):
        raise InputError(
            f"the unit TBE kernels need a 2-D matrix whose last dimension is a "
            f"multiple of 8 and under 2**31 elements, got shape {m.shape} "
            f"(moeflow.compress.gpu.tbe_decode / tbe_linear take any TBE matrix)"
        )


def _check(m: TBEMatrix, layout: str, rows_per_slab: int, num_warps: int, block_rows: int) -> None:
    if layout not in LAYOUTS:
        raise ConfigError("layout", layout, f"one of {LAYOUTS}")
    if rows_per_slab not in SLAB_ROWS:
        raise ConfigError("rows_per_slab", rows_per_slab, f"one of {SLAB_ROWS}")
    if num_warps not in (1, 2, 4, 8, 16):
        raise ConfigError("num_warps", num_warps, "a power of two from 1 to 16")
    _check_matrix(m, block_rows)


_TABLES: dict = {}


def _tables_np(base: int) -> np.ndarray:
    """int32 [2560]: the selector table (256 x 4) and the three plane spread tables (3 x 256
    x 2) that ``_unit_words`` reads; see the module docstring."""
    qf = np.zeros((256, 4), np.uint32)
    for cm in range(256):
        for j in range(8):
            r = bin(cm & ((1 << j) - 1)).count("1")
            q = 0x80 + 0x11 * r  # nibbles (r, r | 8)
            f = 0x10 + 0x22 * (j - r)  # nibbles (2f, 2f + 1); f >= 4 takes the slow path
            qf[cm, j // 4] |= q << (8 * (j % 4))
            qf[cm, 2 + j // 4] |= (f & 0xFF) << (8 * (j % 4))
    sp = np.zeros((3, 256, 2), np.uint64)
    for p in range(3):
        for b in range(256):
            for j in range(8):
                if b >> j & 1:
                    sp[p, b, j // 4] += 1 << (8 * (j % 4) + p)
    # bytes stay in 0..255: base + code <= 255, and a base of -1 is stored as 0 (the kernels
    # subtract 1 from covered weights' bytes then; NEG)
    sp[0] += max(base, 0) * 0x01010101
    return np.concatenate([qf.reshape(-1), sp.astype(np.uint32).reshape(-1)]).view(np.int32)


def _tables(m: TBEMatrix) -> torch.Tensor:
    key = (str(m.planes.device), m.base)
    t = _TABLES.get(key)
    if t is None:
        t = _TABLES[key] = torch.from_numpy(_tables_np(m.base)).to(m.planes.device)
    return t


def _streams(m: TBEMatrix):
    """planes; covered bytes and fallbacks as int32 words; fallbacks as int16."""
    return m.planes, m.covered.view(torch.int32), m.fallback.view(torch.int32), m.fallback


def tbe_decode(
    m: TBEMatrix,
    layout: str = "rows",
    rows_per_slab: int = 32,
    num_warps: int = 4,
    block_rows: int = 1,
) -> torch.Tensor:
    """Dense tensor (original shape and dtype) of a TBE matrix, decoded on its device.

    ``layout="rows"``: one thread per matrix row, ``block_rows`` 64-row blocks per program
    (``2 * block_rows`` warps; ``num_warps`` is not used). ``layout="units"``: one program
    per 64x64 block, walking ``64 / rows_per_slab`` slabs of ``[rows, 8]`` units."""
    _check(m, layout, rows_per_slab, num_warps, block_rows)
    out = torch.empty(max(2, m.numel), dtype=torch.int16, device=m.planes.device)
    BR, BC = m.blocks
    if m.numel:
        args = (
            *_streams(m),
            m.cov_off,
            m.fb_off,
            out.view(torch.int32),
            m.rows,
            m.cols,
            m.cols // 8,
            BC,
            _tables(m),
        )
        common = dict(
            P=m.planes_per_tile,
            IS_BF16=m.dtype == torch.bfloat16,
            HW=not interpreted(),
            NEG=m.base < 0,
        )
        if layout == "rows":
            decode_rows_kernel[(-(-BR // block_rows), BC)](
                *args, RB=block_rows, **common, num_warps=2 * block_rows
            )
        else:
            decode_units_kernel[(BR, BC)](*args, SR=rows_per_slab, **common, num_warps=num_warps)
    return out[: m.numel].view(m.dtype).reshape(m.shape)


MODES = ("auto", "fma", "dot", "decode")
FMA_TOKENS = 8  # tokens per fused-kernel pass (accumulators per thread: 8 per token)
FMA_MAX_TOKENS = 8  # mode="auto" fuses up to this many tokens, else decodes and matmuls


# K splits so that (row programs x splits) covers every SM about eight times
default_split_k = functools.partial(matrix.default_split_k, waves=8)


def tbe_linear(
    x: torch.Tensor,
    m: TBEMatrix,
    split_k: int | None = None,
    block_rows: int = 1,
    mode: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``y = x @ W^T`` with W ``(out_features, in_features)`` kept in TBE form.

    x is ``(..., in_features)`` with 1-128 rows once flattened (0 gives an empty result), same
    dtype and device as W. ``mode="fma"`` runs the fused kernel (one thread per row of W,
    ``block_rows`` 64-row blocks per program, ``split_k`` shares of the K blocks summed in
    fp32 afterwards; more than ``FMA_TOKENS`` tokens take several passes). ``mode="dot"`` is
    the same kernel shape on tensor cores (tokens padded to 16, all 128 in one pass).
    ``mode="decode"`` decodes W to a dense buffer and calls ``torch.matmul``. ``"auto"`` fuses
    up to ``FMA_MAX_TOKENS`` tokens on CUDA cores and decodes for more (until a GPU run says
    which of "dot" and "decode" wins). Accumulates in fp32; returns ``out_dtype`` (default
    x.dtype).
    """
    if mode not in MODES:
        raise ConfigError("mode", mode, f"one of {MODES}")
    _check_matrix(m, block_rows)
    lead, x_NC = skinny_input(x, m)
    if out_dtype is None:
        out_dtype = x.dtype
    N = x_NC.shape[0]
    R, C = m.rows, m.cols
    BR, BC = m.blocks
    if N == 0 or R == 0:
        return torch.zeros((*lead, R), dtype=out_dtype, device=x.device)
    if mode == "decode" or (mode == "auto" and N > FMA_MAX_TOKENS):
        w = tbe_decode(m, block_rows=block_rows).reshape(R, C)
        y = torch.matmul(x_NC, w.T) if not interpreted() else (x_NC.float() @ w.float().T)
        return y.to(out_dtype).reshape(*lead, R)
    row_programs = -(-BR // block_rows)
    if split_k is None:
        split_k = default_split_k(row_programs, BC, x.device)
    if not isinstance(split_k, int) or split_k < 1:
        raise ConfigError("split_k", split_k, "a positive int")
    per = -(-BC // split_k)
    split_k = -(-BC // per)  # no empty splits
    if mode == "dot":
        BN = max(16, triton.next_power_of_2(N))
        y = torch.empty((split_k, N, R), dtype=torch.float32, device=x.device)
        linear_dot_kernel[(row_programs, split_k)](
            x_NC,
            *_streams(m),
            m.cov_off,
            m.fb_off,
            _tables(m),
            y,
            N,
            R,
            C,
            C // 8,
            BC,
            x_NC.stride(0),
            y.stride(0),
            y.stride(1),
            per,
            RB=block_rows,
            BN=BN,
            P=m.planes_per_tile,
            IS_BF16=m.dtype == torch.bfloat16,
            HW=not interpreted(),
            NEG=m.base < 0,
            DOT_F32=interpreted(),
            num_warps=2 * block_rows,
        )
        return (y.sum(0) if split_k > 1 else y[0]).to(out_dtype).reshape(*lead, R)
    out = torch.empty((N, R), dtype=torch.float32, device=x.device)
    common = dict(
        P=m.planes_per_tile,
        IS_BF16=m.dtype == torch.bfloat16,
        HW=not interpreted(),
        NEG=m.base < 0,
        RB=block_rows,
        num_warps=2 * block_rows,
    )
    for n0 in range(0, N, FMA_TOKENS):
        xs = x_NC[n0 : n0 + FMA_TOKENS]
        n = xs.shape[0]
        y = torch.empty((split_k, n, R), dtype=torch.float32, device=x.device)
        linear_rows_kernel[(row_programs, split_k)](
            xs,
            *_streams(m),
            m.cov_off,
            m.fb_off,
            _tables(m),
            y,
            n,
            R,
            C,
            C // 8,
            BC,
            xs.stride(0),
            y.stride(0),
            y.stride(1),
            per,
            BN=max(1, triton.next_power_of_2(n)),
            **common,
        )
        out[n0 : n0 + n] = y.sum(0) if split_k > 1 else y[0]
    return out.to(out_dtype).reshape(*lead, R)
