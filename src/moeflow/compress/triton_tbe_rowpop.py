"""Row-mask popcount Triton kernels for TBE: decode to dense and fused decompress-GEMM.

Same format and results as :mod:`moeflow.compress.triton_tbe` (SYSTEMS.md, "ZipServ"), but an
element finds its stream slot with popcounts instead of a scan over the block's elements.

Row mask. For row ``r`` of a 64x64 block, ``M[r]`` is the 64-bit word whose bit ``c`` says
"element (r, c) is covered": byte ``t`` of ``M[r]`` is byte ``r % 8`` of the OR of the three
code planes of tile ``(r // 8, t)`` (a code is non-zero iff some plane bit is set), restricted
to positions inside the tensor. With ``V[r]`` the number of in-tensor positions of the row (a
prefix of the row: columns past ``C``, rows past ``R`` and, for 1-D tensors, elements past
``numel`` are padding that stores nothing), the slots are::

    cov_slot(r, c) = cov_off[blk] + sum_{r' < r} popc(M[r'])          + popc(M[r] & (2^c - 1))
    fb_slot(r, c)  = fb_off[blk]  + sum_{r' < r} (V[r'] - popc(M[r'])) + c - popc(M[r] & (2^c - 1))

(the fallback rank is "positions before c" minus "covered before c", since every in-tensor
position is either covered or fallback). The only scan is over row totals: 16-64 values per
program, not 1024-4096 elements. ``M[r]`` is held as two int32 halves (tiles 0-3 and 4-7); the
rank inside a row is a per-tile prefix ``popc(half & (2^(8 t%4) - 1)) (+ popc(lo) for t >= 4)``
plus ``popc(byte & (2^(c%8) - 1))``.

Popcount is the SWAR sequence on uint32. It runs under ``TRITON_INTERPRET=1`` (libdevice.popc
does not), and LLVM recognises the idiom and emits the hardware ``popc.b32`` on sm_90 (the test
checks the PTX).

Layout. A program works on a slab of ``SR`` rows (16, 32 or 64) x 64 columns of one block, held
as ``[SR, 8, 8]`` = (row, tile column, column in tile). Two variants compute the same thing:
``layout="tile"`` loads each tile's plane words once as ``[SR, 8, 1]`` and broadcasts (fewer
ops, but Triton converts some full tensors between layouts through shared memory);
``layout="element"`` lets every element load its tile's words and reduces row masks from the
element tensor, so nothing changes layout (more integer ops). Which wins is a GPU question.

- ``tbe_decode``: one program per block, walking its ``64 / SR`` slabs and carrying the running
  stream offsets from slab to slab.
- ``tbe_linear``: one program per (slab of ``SR`` output rows, K split). The program's slab
  starts ``r0`` rows into each block; its offset into the block's streams is the popcount of
  the tile words of the block's first ``r0 / 8`` tile rows. Decoded weights go from registers
  into ``tl.dot`` (``mode="dot"``) or into a broadcast multiply-add (``mode="fma"``, for a few
  tokens, where a 16-row MMA would be mostly padding); they never touch global memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.compress.triton_tbe import TBEMatrix, _interpreted, _num_sms, skinny_input
from moeflow.errors import ConfigError, InputError

SLAB_ROWS = (16, 32, 64)
MODES = ("auto", "fma", "dot")
LAYOUTS = ("element", "tile")
FMA_MAX_TOKENS = 4  # mode="auto" multiplies on CUDA cores up to this many tokens


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _popc(x):
    """Number of set bits of each int32 (SWAR on uint32; becomes popc.b32 on NVIDIA)."""
    u = x.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32, bitcast=True)


@triton.jit
def _slab_bits_tile(planes, cov_ptr, fb_ptr, c0, f0, br, bc, r0, R, C, n, TC, base,
               SR: tl.constexpr, P: tl.constexpr, IS_BF16: tl.constexpr):
    """``_slab_bits`` computing per-(row, tile) values once as ``[SR, 8, 1]`` tensors (fewer
    ops; Triton may move them into the element layout through shared memory).

    Rows ``r0 .. r0+SR-1`` of block (br, bc), given the stream slots ``c0``/``f0`` of its first
    element. Returns the raw bits (int32 ``[SR, 8, 8]``, zero outside the tensor), the in-tensor
    mask, the flat element index, and the slots just past the slab (module docstring's
    equations)."""
    # per-row quantities are [SR, 1, 1], per-(row, tile) ones [SR, 8, 1], elements [SR, 8, 8]:
    # all in one 3-D layout family, so broadcasting needs no layout conversion
    rr = tl.arange(0, SR)[:, None, None]
    tt = tl.arange(0, 8)[None, :, None]
    ci = tl.arange(0, 8)[None, None, :]
    row = br * 64 + r0 + rr
    # in-tensor positions of each row form a prefix of it (1-D tensors end mid-row)
    row_end = tl.minimum(n - row.to(tl.int64) * C, C) - bc * 64
    nv = tl.minimum(tl.maximum(row_end, 0), 64).to(tl.int32)             # V[r]
    # one byte per (row, tile) and plane: byte r%8 of the tile's 64-bit word = byte r%4 of
    # its low (rows 0-3) or high (rows 4-7) int32 half
    tile_c = bc * 8 + tt
    tmask = (row < R) & (tile_c < TC)
    widx = ((row // 8).to(tl.int64) * TC + tile_c) * (2 * P) + (row % 8) // 4
    sh = (row % 4) * 8
    b0 = (tl.load(planes + widx, mask=tmask, other=0) >> sh) & 0xFF
    b1 = (tl.load(planes + widx + 2, mask=tmask, other=0) >> sh) & 0xFF
    b2 = (tl.load(planes + widx + 4, mask=tmask, other=0) >> sh) & 0xFF
    nvt = tl.minimum(tl.maximum(nv - tt * 8, 0), 8)
    cb = (b0 | b1 | b2) & ((1 << nvt) - 1)                               # M[r] byte t
    # M[r] as two int32 halves; the fields are disjoint, so the sum is their OR
    tsh = (tt % 4) * 8
    lo = tl.sum(tl.where(tt < 4, cb << tsh, 0), axis=1, keep_dims=True)
    hi = tl.sum(tl.where(tt >= 4, cb << tsh, 0), axis=1, keep_dims=True)
    plo = _popc(lo)
    cnt = plo + _popc(hi)                                                # popc(M[r])
    fcnt = nv - cnt
    crow = tl.cumsum(cnt, axis=0) - cnt                                  # scan over SR rows only
    frow = tl.cumsum(fcnt, axis=0) - fcnt
    # covered elements in tiles 0..t-1 of the row
    tpre = _popc(tl.where(tt < 4, lo, hi) & ((1 << tsh) - 1)) + tl.where(tt >= 4, plo, 0)
    col = tt * 8 + ci                                                    # column in block
    covered = ((cb >> ci) & 1) != 0
    valid = col < nv
    fallback = valid & ~covered
    crank = tpre + _popc(cb & ((1 << ci) - 1))
    cslot = c0 + crow + crank
    fslot = f0 + frow + col - crank
    sm = tl.load(cov_ptr + cslot, mask=covered, other=0).to(tl.int32)
    fb = tl.load(fb_ptr + fslot, mask=fallback, other=0).to(tl.int32) & 0xFFFF
    code = ((b0 >> ci) & 1) | (((b1 >> ci) & 1) << 1) | (((b2 >> ci) & 1) << 2)
    e = base + code
    if IS_BF16:
        cbits = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
    else:  # planes 3..5 carry sign, m9, m8 of covered fp16 weights
        b3 = (tl.load(planes + widx + 6, mask=tmask, other=0) >> sh) & 0xFF
        b4 = (tl.load(planes + widx + 8, mask=tmask, other=0) >> sh) & 0xFF
        b5 = (tl.load(planes + widx + 10, mask=tmask, other=0) >> sh) & 0xFF
        x3 = ((b3 >> ci) & 1) | (((b4 >> ci) & 1) << 1) | (((b5 >> ci) & 1) << 2)
        cbits = ((x3 & 4) << 13) | (e << 10) | ((x3 & 3) << 8) | sm
    bits = tl.where(covered, cbits, fb)  # fb is 0 outside the tensor
    k = row.to(tl.int64) * C + bc * 64 + col
    return bits, valid, k, c0 + tl.sum(cnt), f0 + tl.sum(fcnt)


@triton.jit
def _slab_bits_elem(planes, cov_ptr, fb_ptr, c0, f0, br, bc, r0, R, C, n, TC, base,
               SR: tl.constexpr, P: tl.constexpr, IS_BF16: tl.constexpr):
    """``_slab_bits`` computing everything per element in one layout (more ops, no layout
    conversion of full tensors).

    Rows ``r0 .. r0+SR-1`` of block (br, bc), given the stream slots ``c0``/``f0`` of its first
    element. Returns the raw bits (int32 ``[SR, 8, 8]``, zero outside the tensor), the in-tensor
    mask, the flat element index, and the slots just past the slab (module docstring's
    equations)."""
    # Everything is computed in the element tensor's own layout ([SR, 8, 8]; per-row values
    # are [SR, 1, 1] reductions of it): each element loads its tile's plane words (8 lanes hit
    # one address) instead of broadcasting a per-tile tensor, which Triton would move through
    # shared memory with a layout conversion.
    rr = tl.arange(0, SR)[:, None, None]
    tt = tl.arange(0, 8)[None, :, None]
    ci = tl.arange(0, 8)[None, None, :]
    row = br * 64 + r0 + rr
    col = tt * 8 + ci                                                    # column in block
    # in-tensor positions of each row form a prefix of it (1-D tensors end mid-row)
    row_end = tl.minimum(n - row.to(tl.int64) * C, C) - bc * 64
    nv = tl.minimum(tl.maximum(row_end, 0), 64).to(tl.int32)             # V[r]
    valid = col < nv
    # bit 8*(r%8) + c%8 of the tile's 64-bit word = bit 8*(r%4) + c%8 of its low (rows 0-3)
    # or high (rows 4-7) int32 half
    tile_c = bc * 8 + tt
    tmask = (row < R) & (tile_c < TC)
    widx = ((row // 8).to(tl.int64) * TC + tile_c) * (2 * P) + (row % 8) // 4
    sh = (row % 4) * 8 + ci
    w0 = tl.load(planes + widx, mask=tmask, other=0)
    w1 = tl.load(planes + widx + 2, mask=tmask, other=0)
    w2 = tl.load(planes + widx + 4, mask=tmask, other=0)
    code = ((w0 >> sh) & 1) | (((w1 >> sh) & 1) << 1) | (((w2 >> sh) & 1) << 2)
    covered = valid & (code != 0)
    # M[r] as two int32 halves (columns 0-31, 32-63); fields are disjoint, so sum = OR
    cpos = col % 32
    cbit = covered.to(tl.int32) << cpos
    lo = tl.sum(tl.sum(tl.where(col < 32, cbit, 0), axis=2, keep_dims=True), axis=1,
                keep_dims=True)                                          # [SR, 1, 1]
    hi = tl.sum(tl.sum(tl.where(col >= 32, cbit, 0), axis=2, keep_dims=True), axis=1,
                keep_dims=True)
    plo = _popc(lo)
    cnt = plo + _popc(hi)                                                # popc(M[r])
    fcnt = nv - cnt
    crow = tl.cumsum(cnt, axis=0) - cnt                                  # scan over SR rows only
    frow = tl.cumsum(fcnt, axis=0) - fcnt
    # covered elements before column c of the row: popc(M[r] & (2^c - 1))
    crank = _popc(tl.where(col < 32, lo, hi) & ~(-1 << cpos)) + tl.where(col >= 32, plo, 0)
    fallback = valid & ~covered
    cslot = c0 + crow + crank
    fslot = f0 + frow + col - crank
    sm = tl.load(cov_ptr + cslot, mask=covered, other=0).to(tl.int32)
    fb = tl.load(fb_ptr + fslot, mask=fallback, other=0).to(tl.int32) & 0xFFFF
    e = base + code
    if IS_BF16:
        cbits = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
    else:  # planes 3..5 carry sign, m9, m8 of covered fp16 weights
        w3 = tl.load(planes + widx + 6, mask=covered, other=0)
        w4 = tl.load(planes + widx + 8, mask=covered, other=0)
        w5 = tl.load(planes + widx + 10, mask=covered, other=0)
        x3 = ((w3 >> sh) & 1) | (((w4 >> sh) & 1) << 1) | (((w5 >> sh) & 1) << 2)
        cbits = ((x3 & 4) << 13) | (e << 10) | ((x3 & 3) << 8) | sm
    bits = tl.where(covered, cbits, fb)  # fb is 0 outside the tensor
    k = row.to(tl.int64) * C + bc * 64 + col
    return bits, valid, k, c0 + tl.sum(cnt), f0 + tl.sum(fcnt)


@triton.jit
def _slab_bits(planes, cov_ptr, fb_ptr, c0, f0, br, bc, r0, R, C, n, TC, base,
               SR: tl.constexpr, P: tl.constexpr, IS_BF16: tl.constexpr, TILE: tl.constexpr):
    """Rows ``r0 .. r0+SR-1`` of block (br, bc): raw bits (int32 ``[SR, 8, 8]``), in-tensor
    mask, flat index, and the stream slots past the slab. ``TILE`` picks the variant."""
    if TILE:
        return _slab_bits_tile(planes, cov_ptr, fb_ptr, c0, f0, br, bc, r0, R, C, n, TC, base,
                               SR, P, IS_BF16)
    else:
        return _slab_bits_elem(planes, cov_ptr, fb_ptr, c0, f0, br, bc, r0, R, C, n, TC, base,
                               SR, P, IS_BF16)


@triton.jit
def _rows_before(planes, br, bc, r0, C, TR, TC, P: tl.constexpr):
    """Covered and fallback counts in rows ``0 .. r0-1`` of block (br, bc), from the tile words
    of its first ``r0 / 8`` tile rows. Those rows are whole in-tensor rows whenever the slab at
    ``r0`` holds any in-tensor element (2-D weights), so their fallback count is
    ``r0 * (valid columns) - covered``."""
    q = tl.arange(0, 8)[:, None]   # tile row in block
    t = tl.arange(0, 8)[None, :]   # tile column in block
    tr = br * 8 + q
    tc = bc * 8 + t
    m = (q * 8 < r0) & (tr < TR) & (tc < TC)
    w = (tr.to(tl.int64) * TC + tc) * (2 * P)
    lo = tl.load(planes + w, mask=m, other=0) | tl.load(planes + w + 2, mask=m, other=0) \
        | tl.load(planes + w + 4, mask=m, other=0)
    hi = tl.load(planes + w + 1, mask=m, other=0) | tl.load(planes + w + 3, mask=m, other=0) \
        | tl.load(planes + w + 5, mask=m, other=0)
    ncol = tl.minimum(tl.maximum(C - bc * 64 - t * 8, 0), 8)
    vb = (1 << ncol) - 1
    vb = vb | (vb << 8) | (vb << 16) | (vb << 24)  # same valid columns in each of 4 rows
    cov = tl.sum(tl.sum(_popc(lo & vb) + _popc(hi & vb), axis=1), axis=0)
    ncv = tl.minimum(tl.maximum(C - bc * 64, 0), 64)
    return cov, r0 * ncv - cov


@triton.jit
def _decode_kernel(planes, cov_ptr, fb_ptr, cov_off, fb_off, out, R, C, n, TC, BC, base,
                   SR: tl.constexpr, P: tl.constexpr, IS_BF16: tl.constexpr,
                   TILE: tl.constexpr):
    br = tl.program_id(0)
    bc = tl.program_id(1)
    blk = br * BC + bc
    c_run = tl.load(cov_off + blk)
    f_run = tl.load(fb_off + blk)
    for j in tl.static_range(64 // SR):
        bits, valid, k, c_run, f_run = _slab_bits(planes, cov_ptr, fb_ptr, c_run, f_run, br, bc,
                                                  j * SR, R, C, n, TC, base, SR, P, IS_BF16,
                                                  TILE)
        tl.store(out + k, bits.to(tl.int16), mask=valid)


@triton.jit
def _linear_kernel(x_ptr, planes, cov_ptr, fb_ptr, cov_off, fb_off, y_ptr, N, R, C, n, TR, TC,
                   base, stride_xn, stride_ys, stride_yn, blocks_per_split,
                   SR: tl.constexpr, P: tl.constexpr, IS_BF16: tl.constexpr, BN: tl.constexpr,
                   USE_DOT: tl.constexpr, DOT_F32: tl.constexpr, TILE: tl.constexpr):
    """y[split, n, r] = sum over this split's K blocks of x[n, k] * W[r, k], r in this slab."""
    SPB: tl.constexpr = 64 // SR
    pid = tl.program_id(0)
    split = tl.program_id(1)
    br = pid // SPB
    r0 = (pid % SPB) * SR
    BC = (C + 63) // 64
    nn = tl.arange(0, BN)[:, None]
    kk = tl.arange(0, 64)[None, :]
    acc_NS = tl.zeros((BN, SR), dtype=tl.float32)
    b_lo = split * blocks_per_split
    b_hi = tl.minimum(b_lo + blocks_per_split, BC)
    for bc in range(b_lo, b_hi):
        blk = br * BC + bc
        c0 = tl.load(cov_off + blk)
        f0 = tl.load(fb_off + blk)
        if SR < 64:
            cb, fbb = _rows_before(planes, br, bc, r0, C, TR, TC, P)
            c0 += cb
            f0 += fbb
        bits, valid, k, c_end, f_end = _slab_bits(planes, cov_ptr, fb_ptr, c0, f0, br, bc, r0,
                                                  R, C, n, TC, base, SR, P, IS_BF16, TILE)
        bits_SK = tl.reshape(bits, [SR, 64])
        col = bc * 64 + kk
        x_NK = tl.load(x_ptr + nn * stride_xn + col, mask=(nn < N) & (col < C), other=0.0)
        if IS_BF16:  # bf16 bits are the top half of an fp32
            w_SK = (bits_SK << 16).to(tl.float32, bitcast=True)
        else:
            w_SK = bits_SK.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        if USE_DOT:
            if DOT_F32:  # Triton's CPU interpreter gets bf16 tl.dot wrong; exact in fp32
                acc_NS += tl.dot(x_NK.to(tl.float32), tl.trans(w_SK))
            else:  # the fp32 -> bf16/fp16 narrowing is exact
                acc_NS += tl.dot(x_NK, tl.trans(w_SK.to(x_NK.dtype)))
        else:
            acc_NS += tl.sum(x_NK.to(tl.float32)[:, None, :] * w_SK[None, :, :], axis=2)
    rr = br * 64 + r0 + tl.arange(0, SR)[None, :]
    tl.store(y_ptr + split * stride_ys + nn * stride_yn + rr, acc_NS, mask=(nn < N) & (rr < R))


# ----------------------------------------------------------------------------- host API
def _check_slab_rows(rows_per_slab: int) -> None:
    if rows_per_slab not in SLAB_ROWS:
        raise ConfigError("rows_per_slab", rows_per_slab, f"one of {SLAB_ROWS}")


def _check_warps(num_warps: int) -> None:
    if num_warps not in (1, 2, 4, 8, 16):
        raise ConfigError("num_warps", num_warps, "a power of two from 1 to 16")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ConfigError("layout", layout, f"one of {LAYOUTS}")


def tbe_decode(m: TBEMatrix, rows_per_slab: int = 16, num_warps: int = 4,
               layout: str = "element") -> torch.Tensor:
    """Dense tensor (original shape and dtype) of a TBE matrix, decoded on its device.

    One program per 64x64 block, decoded as ``64 / rows_per_slab`` slabs (module docstring's
    slot equations); ``layout`` picks the slab variant ("element" or "tile")."""
    if not isinstance(m, TBEMatrix):
        raise InputError(f"tbe_decode takes a TBEMatrix, got {type(m).__name__}")
    _check_slab_rows(rows_per_slab)
    _check_warps(num_warps)
    _check_layout(layout)
    out = torch.empty(max(1, m.numel), dtype=torch.int16, device=m.planes.device)
    BR, BC = m.blocks
    if m.numel:
        _decode_kernel[(BR, BC)](m.planes, m.covered, m.fallback, m.cov_off, m.fb_off, out,
                                 m.rows, m.cols, m.numel, (m.cols + 7) // 8, BC, m.base,
                                 SR=rows_per_slab, P=m.planes_per_tile,
                                 IS_BF16=m.dtype == torch.bfloat16, TILE=layout == "tile",
                                 num_warps=num_warps)
    return out[: m.numel].view(m.dtype).reshape(m.shape)


def default_split_k(row_programs: int, k_blocks: int, device: torch.device,
                    waves: int = 4) -> int:
    """K splits so that (row programs x splits) covers every SM about ``waves`` times."""
    return max(1, min(k_blocks, -(-waves * _num_sms(device) // max(1, row_programs))))


def tbe_linear(x: torch.Tensor, m: TBEMatrix, split_k: int | None = None,
               rows_per_slab: int = 16, num_warps: int = 4, mode: str = "auto",
               layout: str = "element", out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``y = x @ W^T`` with W ``(out_features, in_features)`` kept in TBE form.

    x is ``(..., in_features)`` with 1-128 rows once flattened (0 gives an empty result), same
    dtype and device as W. Each program owns ``rows_per_slab`` output rows and a share of the
    K blocks (``split_k`` shares; partial sums are added in fp32 by one ``sum`` afterwards).
    ``mode``: "dot" feeds ``tl.dot``, "fma" multiplies on CUDA cores, "auto" picks "fma" up to
    ``FMA_MAX_TOKENS`` tokens. ``layout`` picks the slab variant. Accumulates in fp32; returns
    ``out_dtype`` (default x.dtype).
    """
    if not isinstance(m, TBEMatrix):
        raise InputError(f"tbe_linear takes a TBEMatrix, got {type(m).__name__}")
    if mode not in MODES:
        raise ConfigError("mode", mode, f"one of {MODES}")
    _check_slab_rows(rows_per_slab)
    _check_warps(num_warps)
    _check_layout(layout)
    lead, x_NC = skinny_input(x, m)
    if out_dtype is None:
        out_dtype = x.dtype
    N = x_NC.shape[0]
    R, C = m.rows, m.cols
    BR, BC = m.blocks
    if N == 0 or R == 0:
        return torch.zeros((*lead, R), dtype=out_dtype, device=x.device)
    use_dot = mode == "dot" or (mode == "auto" and N > FMA_MAX_TOKENS)
    BN = triton.next_power_of_2(N)
    if use_dot:
        BN = max(16, BN)
    row_programs = BR * (64 // rows_per_slab)
    if split_k is None:
        split_k = default_split_k(row_programs, BC, x.device)
    if not isinstance(split_k, int) or split_k < 1:
        raise ConfigError("split_k", split_k, "a positive int")
    per = -(-BC // split_k)
    split_k = -(-BC // per)  # no empty splits
    y = torch.empty((split_k, N, R), dtype=torch.float32, device=x.device)
    _linear_kernel[(row_programs, split_k)](
        x_NC, m.planes, m.covered, m.fallback, m.cov_off, m.fb_off, y, N, R, C, R * C,
        (R + 7) // 8, (C + 7) // 8, m.base, x_NC.stride(0), y.stride(0), y.stride(1), per,
        SR=rows_per_slab, P=m.planes_per_tile, IS_BF16=m.dtype == torch.bfloat16, BN=BN,
        USE_DOT=use_dot, DOT_F32=_interpreted(), TILE=layout == "tile", num_warps=num_warps)
    out = y.sum(0) if split_k > 1 else y[0]
    return out.to(out_dtype).reshape(*lead, R)
