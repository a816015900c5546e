"""Triton kernels of ZipCCL's GPU codec: a fixed-length static exponent code.

A bit stream of variable-length codes serializes a GPU warp, so the GPU format trades a
little ratio for a layout every thread can address directly (ZipCCL's point that the GPU
kernels need a communication-aware layout; the same trade as ZipServ's TBE): per value a
4-bit code, ``0`` = escape, ``1`` = exponent field 0 (zeros, subnormals), ``2..15`` = the 14
exponents ``base .. base + 13``. ``base`` comes from the scale statistic of the CPU codec
(the mean exponent of a strided sample, ``collective.choose``): the Gaussian model says
which 14 binades around the scale hold the most values. Escaped exponents are stored in
order in an escape array, and each block of ``BLOCK`` values records where its escapes
start, so a decoding program finds its escapes with an in-block prefix count.

bf16: 4 code bits + the byte ``sign<<7 | m[6:0]`` (12 bits a value when nothing escapes,
ratio 1.33); fp32: 4 + 24 bits (1.14). fp16 is not coded here (use the CPU codec).

Message (uint8 tensor on the device)::

    i64 header[8] = magic, dtype code, n, base, n_blocks, n_escapes, 0, 0
    | i32 escape_start[n_blocks + 1] | u8 codes[ceil(n / 2)] | u8 raw[n * raw width]
    | u8 escapes[n_escapes] | i64 checksum

The checksum (:func:`device_checksum`) is a position-weighted sum over the message's
32-bit words, computed with torch ops on the device: it catches corruption in transit, not
a forger. Kernels run on CPU under ``TRITON_INTERPRET=1`` (tests) and on GPUs.
"""

from __future__ import annotations

import math

import torch

from moeflow._deps import require
from moeflow.errors import CorruptDataError, InputError

triton = require("triton", "moeflow.compress.collective_gpu")
import triton.language as tl  # noqa: E402  (after the ImportError that names the extra)

BLOCK = 1024
MAGIC = 0x5A43_4750_5531  # "ZCGPU1"
NCODES = 14
_CODES = {torch.bfloat16: 1, torch.float32: 3}
_DTYPES = {v: k for k, v in _CODES.items()}
_HEAD_BYTES = 64


def window_start() -> int:
    """Relative binade (to ``log2 RMS``) where the 14-binade window of the Gaussian model
    starts: the start that covers the most probability."""
    from moeflow.compress import collective as C

    p = C.binade_probs(2.0, 0.0)
    cover = [p[s : s + NCODES].sum() for s in range(C.WINDOW - NCODES + 1)]
    return int(max(range(len(cover)), key=cover.__getitem__)) - C.WINDOW_BELOW


@triton.jit
def _encode_kernel(
    x_ptr, n, base, code_ptr, raw_ptr, count_ptr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr
):
    """Codes (two per byte), raw bytes and the block's escape count."""
    pid = tl.program_id(0)
    i = tl.arange(0, BLOCK // 2)[:, None] * 2 + tl.arange(0, 2)[None, :]
    k = pid.to(tl.int64) * BLOCK + i
    valid = k < n
    v = tl.load(x_ptr + k, mask=valid, other=0).to(tl.int32)
    if IS_BF16:
        v = v & 0xFFFF
        e = (v >> 7) & 0xFF
    else:
        e = (v >> 23) & 0xFF
    d = e - base
    code = tl.where(e == 0, 1, tl.where((d >= 0) & (d < 14), d + 2, 0))
    esc = valid & (code == 0)
    byte = tl.sum(code * tl.where(tl.arange(0, 2)[None, :] == 0, 1, 16), axis=1)
    j = pid.to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    tl.store(code_ptr + j, byte.to(tl.uint8), mask=j < (n + 1) // 2)
    if IS_BF16:
        tl.store(raw_ptr + k, (((v >> 8) & 0x80) | (v & 0x7F)).to(tl.uint8), mask=valid)
    else:
        tl.store(raw_ptr + k, (v & 0xFF).to(tl.uint8), mask=valid)
        tl.store(raw_ptr + n + k, ((v >> 8) & 0xFF).to(tl.uint8), mask=valid)
        tl.store(
            raw_ptr + 2 * n + k, (((v >> 16) & 0x7F) | ((v >> 24) & 0x80)).to(tl.uint8), mask=valid
        )
    tl.store(count_ptr + pid, tl.sum(tl.sum(esc.to(tl.int32), axis=1), axis=0))


@triton.jit
def _decode_kernel(
    code_ptr,
    raw_ptr,
    esc_ptr,
    start_ptr,
    out_ptr,
    n,
    base,
    IS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    i = tl.arange(0, BLOCK // 2)[:, None] * 2 + tl.arange(0, 2)[None, :]
    k = pid.to(tl.int64) * BLOCK + i
    valid = k < n
    j = pid.to(tl.int64) * (BLOCK // 2) + tl.arange(0, BLOCK // 2)
    byte = tl.load(code_ptr + j, mask=j < (n + 1) // 2, other=0).to(tl.int32)
    code = tl.where(tl.arange(0, 2)[None, :] == 0, byte[:, None] & 15, byte[:, None] >> 4)
    esc = valid & (code == 0)
    # exclusive row-major prefix count of escapes in the block
    ei = esc.to(tl.int32)
    row = tl.sum(ei, axis=1)
    idx = (tl.cumsum(row, axis=0) - row)[:, None] + tl.cumsum(ei, axis=1) - ei
    s0 = tl.load(start_ptr + pid)
    ee = tl.load(esc_ptr + s0 + idx, mask=esc, other=0).to(tl.int32) & 0xFF
    e = tl.where(code == 1, 0, tl.where(esc, ee, base + code - 2))
    if IS_BF16:
        r = tl.load(raw_ptr + k, mask=valid, other=0).to(tl.int32) & 0xFF
        bits = ((r & 0x80) << 8) | (e << 7) | (r & 0x7F)
        tl.store(out_ptr + k, bits.to(tl.int16), mask=valid)
    else:
        r0 = tl.load(raw_ptr + k, mask=valid, other=0).to(tl.int32) & 0xFF
        r1 = tl.load(raw_ptr + n + k, mask=valid, other=0).to(tl.int32) & 0xFF
        r2 = tl.load(raw_ptr + 2 * n + k, mask=valid, other=0).to(tl.int32) & 0xFF
        bits = ((r2 & 0x80) << 24) | (e << 23) | ((r2 & 0x7F) << 16) | (r1 << 8) | r0
        tl.store(out_ptr + k, bits, mask=valid)


def device_checksum(b: torch.Tensor) -> int:
    """Position-weighted sum of the 32-bit little-endian words of uint8 ``b`` (zero-padded),
    two lanes in wrapping int64 arithmetic, folded to 63 bits."""
    pad = (-b.numel()) % 4
    if pad:
        b = torch.cat([b, b.new_zeros(pad)])
    w = b.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    pos = torch.arange(1, w.numel() + 1, device=b.device, dtype=torch.int64)
    h1 = int((w * (2 * pos + 1)).sum())
    h2 = int((w ^ (pos * 0x9E3779B1)).sum())
    return (h1 * 0x100000001B3 ^ h2 ^ b.numel()) & ((1 << 63) - 1)


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().reshape(-1).view(torch.int16 if x.element_size() == 2 else torch.int32)


def choose_base(x: torch.Tensor) -> int:
    """Exponent field of code 2: the CPU codec's scale statistic on a strided sample."""
    from moeflow.compress import collective as C

    name = "bfloat16" if x.dtype == torch.bfloat16 else "float32"
    step = max(1, x.numel() // C.SAMPLE)
    sample = _bits(x)[::step].cpu().numpy()
    ch = C.choose(
        sample.view("uint16" if x.element_size() == 2 else "uint32"), name, shapes=C.GAUSSIAN
    )
    # Choice.base is the field of relative binade -WINDOW_BELOW
    return ch.base + C.WINDOW_BELOW + window_start()


def gpu_encode(x: torch.Tensor) -> torch.Tensor:
    """One message (uint8, on ``x``'s device) holding bf16/fp32 tensor ``x``."""
    if x.dtype not in _CODES:
        raise InputError(f"the GPU collective codec takes bfloat16 or float32, not {x.dtype}")
    n = x.numel()
    bits = _bits(x)
    dev = x.device
    base = choose_base(x) if n else 0
    nb = max(1, math.ceil(n / BLOCK))
    raw_w = 1 if x.dtype == torch.bfloat16 else 3
    codes = torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev)
    raw = torch.empty(n * raw_w, dtype=torch.uint8, device=dev)
    counts = torch.zeros(nb, dtype=torch.int32, device=dev)
    if n:
        _encode_kernel[(nb,)](
            bits, n, base, codes, raw, counts, IS_BF16=x.dtype == torch.bfloat16, BLOCK=BLOCK
        )
    start = torch.zeros(nb + 1, dtype=torch.int32, device=dev)
    start[1:] = torch.cumsum(counts, 0)
    shift, mask = (7, 0xFF) if x.dtype == torch.bfloat16 else (23, 0xFF)
    e = (bits.to(torch.int64) >> shift) & mask
    d = e - base
    escaped = (e != 0) & ((d < 0) | (d >= NCODES))
    esc = e[escaped].to(torch.uint8)
    head = torch.tensor(
        [MAGIC, _CODES[x.dtype], n, base, nb, esc.numel(), 0, 0], dtype=torch.int64, device=dev
    ).view(torch.uint8)
    body = torch.cat([head, start.view(torch.uint8), codes, raw, esc])
    tail = torch.tensor([device_checksum(body)], dtype=torch.int64, device=dev)
    return torch.cat([body, tail.view(torch.uint8)])


def gpu_decode(msg: torch.Tensor) -> torch.Tensor:
    """The flat tensor held by a message; CorruptDataError on a checksum or layout mismatch."""
    if msg.dtype != torch.uint8 or msg.numel() < _HEAD_BYTES + 12:
        raise CorruptDataError(f"GPU collective message of {msg.numel()} bytes is too short")
    body = msg[:-8]
    want = int(msg[-8:].clone().view(torch.int64)[0])
    if device_checksum(body) != want:
        raise CorruptDataError(
            "GPU collective message checksum mismatch: the bytes were corrupted in transit"
        )
    magic, code, n, base, nb, n_esc, _, _ = msg[:_HEAD_BYTES].clone().view(torch.int64).tolist()
    if magic != MAGIC or code not in _DTYPES or nb != max(1, math.ceil(n / BLOCK)):
        raise CorruptDataError(
            f"not a GPU collective message (magic {magic:#x}, dtype code "
            f"{code}, {nb} blocks for {n} values)"
        )
    dtype = _DTYPES[code]
    raw_w = 1 if dtype == torch.bfloat16 else 3
    o = _HEAD_BYTES
    sizes = [4 * (nb + 1), (n + 1) // 2, n * raw_w, n_esc]
    if o + sum(sizes) != body.numel():
        raise CorruptDataError(f"GPU collective message of {n} values has {msg.numel()} bytes")
    start = body[o : o + sizes[0]].clone().view(torch.int32)
    o += sizes[0]
    codes = body[o : o + sizes[1]]
    o += sizes[1]
    raw = body[o : o + sizes[2]]
    o += sizes[2]
    esc = body[o : o + sizes[3]]
    if int(start[0]) != 0 or int(start[-1]) != n_esc or bool((start[1:] < start[:-1]).any()):
        raise CorruptDataError("GPU collective message escape table is inconsistent")
    out = torch.empty(
        n, dtype=torch.int16 if dtype == torch.bfloat16 else torch.int32, device=msg.device
    )
    if n:
        _decode_kernel[(nb,)](
            codes, raw, esc, start, out, n, base, IS_BF16=dtype == torch.bfloat16, BLOCK=BLOCK
        )
    return out.view(dtype)


__all__ = ["BLOCK", "device_checksum", "gpu_decode", "gpu_encode", "window_start"]
