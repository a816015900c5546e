"""Weights and checks shared by the GPU-kernel tests."""

from __future__ import annotations

import torch


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw 16-bit patterns of ``t``, flat (NaN payloads compare exactly)."""
    return t.contiguous().view(-1).view(torch.int16)


def hard_weights(shape, dtype, seed: int = 0) -> torch.Tensor:
    """Mostly in-window values plus many fallbacks: out-of-window exponents, +-0, +-inf, NaN
    payloads, subnormals and the largest finite values."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    flat = w.view(-1)
    n = flat.numel()
    if n:
        flat[::5] = (torch.randn(n, generator=g)[::5] * 3000).to(dtype)
        raw = flat.view(torch.int16)
        specials = [0x0000, 0x8000, 0x0001, 0x8001]  # zeros and smallest subnormals
        if dtype == torch.bfloat16:
            specials += [0x7F80, 0xFF80, 0x7FC1, 0xFFFF, 0x7F7F, 0x007F]
        else:
            specials += [0x7C00, 0xFC00, 0x7E01, 0xFFFF, 0x7BFF, 0x03FF]
        for i, v in enumerate(specials):
            raw[(7 * i + 3) % n :: 11 * len(specials)] = v - 65536 if v >= 32768 else v
    return w


def finite(w: torch.Tensor, limit: float = 60.0) -> torch.Tensor:
    """``w`` with non-finite values and those above ``limit`` in magnitude replaced by
    ``limit``: products and sums stay finite in fp16, and the replaced values are still far
    outside the exponent window (fallbacks)."""
    keep = torch.isfinite(w) & (w.float().abs() <= limit)
    return torch.where(keep, w, torch.full_like(w, limit))


def low_exponents(shape, seed: int = 0) -> torch.Tensor:
    """bf16 values whose exponents cluster at 0..6 (subnormals and the smallest normals), so
    the window starts at base -1, plus 10% of arbitrary bit patterns as fallbacks."""
    g = torch.Generator().manual_seed(seed)
    n = 1
    for s in shape:
        n *= s
    e = torch.randint(0, 7, (n,), generator=g)
    raw = (
        (torch.randint(0, 2, (n,), generator=g) << 15)
        | (e << 7)
        | torch.randint(0, 128, (n,), generator=g)
    )
    wild = torch.rand(n, generator=g) < 0.1
    raw = torch.where(wild, torch.randint(0, 65536, (n,), generator=g), raw)
    return raw.to(torch.int32).to(torch.int16).view(torch.bfloat16).reshape(shape)


def all_patterns(dtype) -> torch.Tensor:
    """Every 16-bit pattern once, as a 256 x 256 matrix of ``dtype``."""
    return torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(256, 256)


def assert_gemm_close(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """``y`` (in ``x.dtype``) is fp32 ``x @ w.T`` rounded once to ``x.dtype``, up to fp32
    accumulation in another order: |y - ref| <= eps |ref| + 1e-5 sum_k |x w|."""
    ref = x.float() @ w.float().T
    scale = x.float().abs() @ w.float().abs().T
    eps = 2.0**-8 if x.dtype == torch.bfloat16 else 2.0**-10
    if x.dtype == torch.float32:
        eps = 0.0
    err = (y.float() - ref).abs()
    bound = eps * ref.abs() + 1e-5 * scale + 1e-6
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}"
