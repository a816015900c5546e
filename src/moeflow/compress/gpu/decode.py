"""Triton decode of TBE weights to a dense tensor: one program per 64x64 block.

ZipServ's TBE format (see :mod:`moeflow.compress.tbe`). Each 64x64 block carries its own
prefix offsets into the covered-byte and fallback streams. In the block, the code of element
``(r, c)`` is bit ``8*(r%8) + c%8`` of its tile's three plane words; its slot in a stream is
the block offset plus an exclusive prefix count of covered (or fallback) flags in row-major
order, computed with two scans (along the row, then over row totals). The exponent is
``base + code``: an add, no table and no variable-length bit stream.

This kernel was measured bit-exact on an H200 at 0.33-0.35 TB/s of bf16 output, ahead of a
slab-wise variant (0.24-0.26 TB/s, since deleted). The tile-row kernels of
:mod:`moeflow.compress.gpu.experimental_unit` are the unmeasured candidate to replace it.
"""

from __future__ import annotations

import torch

from moeflow._deps import require
from moeflow.compress.gpu.matrix import TBEMatrix, check_matrix

triton = require("triton", "moeflow.compress.gpu")
import triton.language as tl  # noqa: E402  (after the ImportError that names the extra)


@triton.jit
def _decode_block(
    planes,
    cov_ptr,
    fb_ptr,
    cov_off,
    fb_off,
    br,
    bc,
    R,
    C,
    n,
    base,
    P: tl.constexpr,
    IS_BF16: tl.constexpr,
):
    """Bits (int32) of block (br, bc) as a [64, 64] tensor, its in-bounds mask, flat index."""
    r = br * 64 + tl.arange(0, 64)[:, None]
    c = bc * 64 + tl.arange(0, 64)[None, :]
    k = r.to(tl.int64) * C + c
    valid = (r < R) & (c < C) & (k < n)
    TC = (C + 7) // 8
    tile = (r // 8).to(tl.int64) * TC + c // 8
    bit = (r % 8) * 8 + (c % 8)
    word = (tile * P) * 2 + bit // 32
    sh = bit % 32
    w0 = tl.load(planes + word, mask=valid, other=0)
    w1 = tl.load(planes + word + 2, mask=valid, other=0)
    w2 = tl.load(planes + word + 4, mask=valid, other=0)
    code = ((w0 >> sh) & 1) | (((w1 >> sh) & 1) << 1) | (((w2 >> sh) & 1) << 2)
    covered = valid & (code != 0)
    fallback = valid & (code == 0)
    blk = br * ((C + 63) // 64) + bc
    # exclusive row-major prefix counts inside the block
    ci = covered.to(tl.int32)
    crow = tl.sum(ci, axis=1)
    cidx = (tl.cumsum(crow, axis=0) - crow)[:, None] + tl.cumsum(ci, axis=1) - ci
    fi = fallback.to(tl.int32)
    frow = tl.sum(fi, axis=1)
    fidx = (tl.cumsum(frow, axis=0) - frow)[:, None] + tl.cumsum(fi, axis=1) - fi
    c0 = tl.load(cov_off + blk)
    f0 = tl.load(fb_off + blk)
    sm = tl.load(cov_ptr + c0 + cidx, mask=covered, other=0).to(tl.int32)
    fb = tl.load(fb_ptr + f0 + fidx, mask=fallback, other=0).to(tl.int32) & 0xFFFF
    e = base + code
    if IS_BF16:
        bits = ((sm & 0x80) << 8) | (e << 7) | (sm & 0x7F)
    else:  # planes 3..5 carry sign, m9, m8 of covered fp16 weights
        w3 = tl.load(planes + word + 6, mask=covered, other=0)
        w4 = tl.load(planes + word + 8, mask=covered, other=0)
        w5 = tl.load(planes + word + 10, mask=covered, other=0)
        x3 = ((w3 >> sh) & 1) | (((w4 >> sh) & 1) << 1) | (((w5 >> sh) & 1) << 2)
        bits = ((x3 & 4) << 13) | (e << 10) | ((x3 & 3) << 8) | sm
    bits = tl.where(covered, bits, fb)
    return bits, valid, k


@triton.jit
def tbe_decode_kernel(
    planes,
    cov_ptr,
    fb_ptr,
    cov_off,
    fb_off,
    out,
    R,
    C,
    n,
    base,
    P: tl.constexpr,
    IS_BF16: tl.constexpr,
):
    br = tl.program_id(0)
    bc = tl.program_id(1)
    bits, valid, k = _decode_block(
        planes, cov_ptr, fb_ptr, cov_off, fb_off, br, bc, R, C, n, base, P, IS_BF16
    )
    tl.store(out + k, bits.to(tl.int16), mask=valid)


def tbe_decode(m: TBEMatrix) -> torch.Tensor:
    """Dense tensor (original shape and dtype) of a TBE matrix, decoded on its device."""
    check_matrix(m, "tbe_decode")
    out = torch.empty(max(1, m.numel), dtype=torch.int16, device=m.planes.device)
    BR, BC = m.blocks
    if m.numel:
        tbe_decode_kernel[(BR, BC)](
            m.planes,
            m.covered,
            m.fallback,
            m.cov_off,
            m.fb_off,
            out,
            m.rows,
            m.cols,
            m.numel,
            m.base,
            P=m.planes_per_tile,
            IS_BF16=m.dtype == torch.bfloat16,
            num_warps=4,
        )
    return out[: m.numel].view(m.dtype).reshape(m.shape)
