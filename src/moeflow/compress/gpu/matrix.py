"""TBE weights on a device, the torch encoder, and the checks the kernels share.

``TBEMatrix`` holds ZipServ's TBE streams (the tensor-core-aware triple bit-plane exponent
format of :mod:`moeflow.compress.tbe`) as device tensors: one 64-bit plane word per 8x8 tile
and plane, prefix offsets per 64x64 block into the covered-byte and fallback streams, and the
two streams themselves. ``tbe_encode_torch`` builds the same streams with torch ops on any
device, so a GPU needs no numba. Nothing here launches a kernel.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from moeflow.errors import InputError

# Zero padding after the device streams: the tile-row kernels (experimental_unit) read each
# tile row's covered bytes and first fallbacks as whole int32 words, up to 12 bytes past its
# slot, so a TBEMatrix always carries it.
COV_PAD = 16
FB_PAD = 8

MAX_TOKENS = 128  # the fused GEMMs are for skinny activations


def interpreted() -> bool:
    """True under ``TRITON_INTERPRET=1`` (kernels run on CPU through Triton's interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA ``device``; 4 elsewhere (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def default_split_k(row_programs: int, k_blocks: int, device: torch.device, waves: int = 4) -> int:
    """K splits so that (row programs x splits) covers every SM about ``waves`` times, and no
    more splits than there are K blocks."""
    return max(1, min(k_blocks, -(-waves * num_sms(device) // max(1, row_programs))))


def _pad_stream(t: torch.Tensor, extra: int, multiple: int) -> torch.Tensor:
    """``t`` (1-D) followed by at least ``extra`` zeros, its length a multiple of ``multiple``."""
    n = -(-(t.numel() + extra) // multiple) * multiple
    out = torch.zeros(n, dtype=t.dtype, device=t.device)
    out[: t.numel()] = t
    return out


@dataclass
class TBEMatrix:
    """A TBE-compressed matrix resident on a device (tensors mirror ``tbe.TBEParts``)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    rows: int
    cols: int
    numel: int
    base: int
    planes_per_tile: int
    planes: torch.Tensor  # int32 [tiles * P * 2]: each 64-bit plane word as (lo, hi)
    cov_off: torch.Tensor  # int64 [blocks + 1]
    fb_off: torch.Tensor  # int64 [blocks + 1]
    covered: torch.Tensor  # uint8 [n_covered + COV_PAD, rounded up to a multiple of 4]
    fallback: torch.Tensor  # int16 [n_fallback + FB_PAD, rounded up to even]

    @property
    def blocks(self) -> tuple[int, int]:
        return (self.rows + 63) // 64, (self.cols + 63) // 64

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for t in (self.planes, self.cov_off, self.fb_off, self.covered, self.fallback)
        )

    @classmethod
    def from_parts(cls, parts, shape, device) -> TBEMatrix:
        """Upload a parsed CPU payload (``tbe.TBEParts``) to ``device``."""

        def dev(a: np.ndarray, dt) -> torch.Tensor:
            a = np.ascontiguousarray(a)
            if a.size == 0:  # keep a valid pointer for masked loads
                a = np.zeros(1, a.dtype)
            return torch.from_numpy(a.copy()).view(dt).to(device)

        def stream(a: np.ndarray, dt) -> torch.Tensor:  # may be empty: padding follows
            return torch.from_numpy(np.ascontiguousarray(a).copy()).view(dt).to(device)

        return cls(
            dtype=getattr(torch, parts.dtype),
            shape=tuple(shape),
            rows=parts.rows,
            cols=parts.cols,
            numel=parts.numel,
            base=parts.base,
            planes_per_tile=parts.planes_per_tile,
            planes=dev(parts.planes.view(np.uint32), torch.int32),
            cov_off=dev(parts.cov_off, torch.int64),
            fb_off=dev(parts.fb_off, torch.int64),
            covered=_pad_stream(stream(parts.covered, torch.uint8), COV_PAD, 4),
            fallback=_pad_stream(stream(parts.fallback.view(np.int16), torch.int16), FB_PAD, 2),
        )

    @classmethod
    def from_tensor(cls, w: torch.Tensor, device=None) -> TBEMatrix:
        """Compress ``w`` (bf16/fp16) with the CPU codec and upload the streams to ``device``."""
        from moeflow.compress.container import CompressedTensor

        ct = CompressedTensor.from_tensor(w, "tbe")
        return cls.from_compressed(ct, device if device is not None else w.device)

    @classmethod
    def from_compressed(cls, ct, device) -> TBEMatrix:
        """Upload a ``CompressedTensor`` with codec "tbe" to ``device``."""
        from moeflow.compress import tbe

        if ct.codec != "tbe":
            raise InputError(f"expected a TBE-coded tensor, got codec {ct.codec!r}")
        return cls.from_parts(tbe.parse(ct.payload, ct.dtype, ct.shape), ct.shape, device)


def check_matrix(m, what: str) -> None:
    """``InputError`` unless ``m`` is a ``TBEMatrix`` (``what`` names the caller)."""
    if not isinstance(m, TBEMatrix):
        raise InputError(f"{what} takes a TBEMatrix, got {type(m).__name__}")


def skinny_input(x, m: TBEMatrix):
    """Validate ``x`` for ``x @ W^T`` with W in TBE form; returns (leading shape, x as a
    contiguous-rows ``(N, in_features)`` view). Shared by the fused-GEMM kernels."""
    check_matrix(m, "tbe_linear")
    if len(m.shape) != 2:
        raise InputError(f"tbe_linear needs a 2-D weight, got shape {m.shape}")
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise InputError("tbe_linear needs x as a tensor of shape (..., in_features)")
    if x.dtype != m.dtype or x.shape[-1] != m.cols:
        raise InputError(
            f"x {tuple(x.shape)} {x.dtype} does not match W {m.shape} {m.dtype}: "
            f"x must be (..., {m.cols}) {m.dtype}"
        )
    if x.device != m.planes.device:
        raise InputError(f"x is on {x.device} but W is on {m.planes.device}")
    x2 = x.reshape(-1, m.cols)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] > MAX_TOKENS:
        raise InputError(
            f"tbe_linear is for skinny activations (1-{MAX_TOKENS} tokens), got {x2.shape[0]}"
        )
    return x.shape[:-1], x2


def tbe_encode_torch(w: torch.Tensor) -> TBEMatrix:
    """TBE-encode ``w`` (bf16/fp16) with torch ops on its own device (GPU or CPU).

    Produces exactly the streams of the CPU codec (``moeflow.compress.tbe``), vectorized:
    codes are laid out on the padded 64x64 block grid, whose block-major, row-major flattening
    is the stream order; plane words are sums of distinct powers of two.
    """
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.bfloat16, torch.float16):
        raise InputError(
            f"TBE takes bfloat16/float16 tensors, not {getattr(w, 'dtype', type(w).__name__)}"
        )
    shape = tuple(w.shape)
    n = w.numel()
    if n and len(shape) >= 2:
        R, C = n // shape[-1], shape[-1]
    else:
        R, C = (n + 63) // 64, 64
    bf16 = w.dtype == torch.bfloat16
    shift, emax, P = (7, 255, 3) if bf16 else (10, 31, 6)
    dev = w.device
    flat = w.detach().reshape(-1).contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    e = (flat >> shift) & emax
    hist = torch.bincount(e, minlength=emax + 1)
    cover = hist.unfold(0, 7, 1).sum(-1)  # window starting at s covers s..s+6, base s-1
    base = int(torch.argmax(cover).item()) - 1
    BR, BC = (R + 63) // 64, (C + 63) // 64
    TR, TC = (R + 7) // 8, (C + 7) // 8
    Rp, Cp = BR * 64, BC * 64
    vals = torch.zeros(Rp * Cp, dtype=torch.int32, device=dev)
    valid = torch.zeros(Rp * Cp, dtype=torch.bool, device=dev)
    if n:  # element k of the tensor sits at (k // C, k % C) of the padded grid
        k = torch.arange(n, device=dev)
        pos = (k // C) * Cp + k % C
        vals[pos] = flat
        valid[pos] = True
    vals = vals.view(Rp, Cp)
    valid = valid.view(Rp, Cp)
    d = ((vals >> shift) & emax) - base
    code = torch.where(valid & (d >= 1) & (d <= 7), d, torch.zeros_like(d))
    bitpos = torch.arange(8, device=dev)[:, None] * 8 + torch.arange(8, device=dev)[None, :]
    weights = torch.ones((), dtype=torch.int64, device=dev) << bitpos.to(torch.int64)  # [8, 8]

    def plane(bit_RC: torch.Tensor) -> torch.Tensor:
        t = bit_RC.to(torch.int64).view(Rp // 8, 8, Cp // 8, 8).permute(0, 2, 1, 3)
        return (t * weights).sum((-1, -2))[:TR, :TC]  # [TR, TC]

    planes = [plane((code >> p) & 1) for p in range(3)]
    if not bf16:
        x3 = ((vals >> 13) & 4) | ((vals >> 8) & 3)
        x3 = torch.where(code != 0, x3, torch.zeros_like(x3))
        planes += [plane((x3 >> p) & 1) for p in range(3)]
    planes_t = torch.stack(planes, -1).reshape(-1).contiguous()  # tile-major, then plane

    def blockwise(t: torch.Tensor) -> torch.Tensor:
        return t.view(BR, 64, BC, 64).permute(0, 2, 1, 3).reshape(-1)

    cov_m = blockwise(code != 0)
    fb_m = blockwise(valid & (code == 0))
    vb = blockwise(vals)
    sm = (((vb >> 8) & 0x80) | (vb & 0x7F)) if bf16 else (vb & 0xFF)
    covered = sm[cov_m].to(torch.uint8)
    fallback = vb[fb_m].to(torch.int16)  # low 16 bits, wraps like a uint16 view
    zero = torch.zeros(1, dtype=torch.int64, device=dev)
    cov_off = torch.cat([zero, cov_m.view(-1, 4096).sum(1).cumsum(0)])
    fb_off = torch.cat([zero, fb_m.view(-1, 4096).sum(1).cumsum(0)])
    planes_i32 = planes_t.view(torch.int32)
    if planes_i32.numel() == 0:
        planes_i32 = torch.zeros(1, dtype=torch.int32, device=dev)
    covered = _pad_stream(covered, COV_PAD, 4)
    fallback = _pad_stream(fallback, FB_PAD, 2)
    return TBEMatrix(
        dtype=w.dtype,
        shape=shape,
        rows=R,
        cols=C,
        numel=n,
        base=base,
        planes_per_tile=P,
        planes=planes_i32,
        cov_off=cov_off,
        fb_off=fb_off,
        covered=covered,
        fallback=fallback,
    )
