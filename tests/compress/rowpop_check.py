"""Checks of the row-mask popcount TBE kernels, run by test_triton_rowpop.py in a subprocess.

    TRITON_INTERPRET=1 python rowpop_check.py interp [--big]   bit-exact decode, fused GEMM, errors
    python rowpop_check.py compile                            front end + PTX/cubin for sm_90
"""

import os
import sys

import torch

from moeflow.compress import tbe
from moeflow.compress import triton_tbe_rowpop as RP
from moeflow.compress.container import CompressedTensor
from moeflow.compress.triton_tbe import TBEMatrix
from moeflow.errors import ConfigError, InputError


def bits(t):
    return t.contiguous().view(-1).view(torch.int16)


def hard_weights(shape, dtype, g):
    """Mostly in-window values plus many fallbacks: out-of-window exponents, +-0, +-inf, NaN
    payloads, subnormals and the largest finite values."""
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
            raw[(7 * i + 3) % n::11 * len(specials)] = torch.tensor(v, dtype=torch.int32).to(
                torch.int16)
    return w


def check_decode(w, **kw):
    m = TBEMatrix.from_tensor(w, device="cpu")
    ct = CompressedTensor.from_tensor(w, "tbe")
    ref = torch.from_numpy(tbe.decode(ct.payload, ct.dtype, ct.shape).view("int16"))
    assert torch.equal(ref, bits(w))  # the CPU codec round-trips: the GPU must match it
    d = RP.tbe_decode(m, **kw)
    assert d.shape == w.shape and d.dtype == w.dtype, (d.shape, d.dtype)
    assert torch.equal(bits(d), bits(w)), (w.dtype, tuple(w.shape), kw)
    return m


def check_gemm(w, m, N, g, linear=None, **kw):
    """``linear(x, m)`` (default the rowpop kernel) against fp32 ``x @ w.T``."""
    x = torch.randn(N, w.shape[1], generator=g).to(w.dtype)
    ref = x.float() @ w.float().T
    y = (linear or RP.tbe_linear)(x, m, out_dtype=torch.float32, **kw)
    assert y.shape == (N, w.shape[0]) and y.dtype == torch.float32
    # fp32 accumulation in another order: error bound from the sum of |terms|
    scale = x.float().abs() @ w.float().abs().T
    err = (y - ref).abs()
    assert bool((err <= 1e-5 * scale + 1e-6).all()), (w.dtype, N, kw, err.max().item())


def interp(big: bool):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    g = torch.Generator().manual_seed(0)
    shapes = [(70, 130), (8, 8), (1, 200), (200,), (5,), (3, 4, 9), (0,)]
    if big:
        shapes += [(130, 260), (64, 64), (3, 70, 40), (4097,)]
    for dtype in (torch.bfloat16, torch.float16):
        for shape in shapes:
            w = hard_weights(shape, dtype, g)
            for kw in ({}, dict(layout="tile"), dict(rows_per_slab=64),
                       dict(rows_per_slab=32, layout="tile")):
                check_decode(w, **kw)
                if not big and (w.numel() < 100 or (dtype == torch.float16 and kw)):
                    break  # default run: tiny shapes and fp16 get the default config only
        # every bit pattern once (NaN payloads, infinities, subnormals)
        allp = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(128, 512)
        for layout in (("element", "tile") if big else
                       (("element",) if dtype == torch.bfloat16 else ("tile",))):
            check_decode(allp, rows_per_slab=64, layout=layout)
        # fused GEMM on a fallback-heavy weight with ragged edges (rows 40..63 are padding)
        w = hard_weights((40, 130), dtype, g)
        wf = w.float()
        w[~wf.isfinite() | (wf.abs() > 1e4)] = 1e4  # no overflow in sums; still fallbacks
        m = TBEMatrix.from_tensor(w, device="cpu")
        for N in ((1, 3, 8, 17) if dtype == torch.bfloat16 else (3, 17)):
            check_gemm(w, m, N, g)
        if dtype == torch.bfloat16:
            check_gemm(w, m, 3, g, mode="dot", layout="tile", rows_per_slab=32, split_k=2)
            check_gemm(w, m, 8, g, mode="fma", rows_per_slab=64, split_k=1)
        else:
            check_gemm(w, m, 17, g, layout="tile", split_k=3)
        if big:
            for N in (32, 128):
                check_gemm(w, m, N, g, rows_per_slab=64)
            for kw in (dict(mode="fma", layout="tile"), dict(mode="dot", rows_per_slab=64),
                       dict(mode="dot", layout="tile", rows_per_slab=16)):
                check_gemm(w, m, 5, g, **kw)
            w2 = hard_weights((150, 200), dtype, g)
            w2[~w2.float().isfinite() | (w2.float().abs() > 1e4)] = 1e4
            m2 = TBEMatrix.from_tensor(w2, device="cpu")
            for N, kw in ((1, {}), (9, dict(layout="tile")), (4, dict(rows_per_slab=32))):
                check_gemm(w2, m2, N, g, **kw)
        x3 = torch.randn(2, 3, 130, generator=g).to(dtype)
        y3 = RP.tbe_linear(x3, m)  # output in x.dtype, one rounding of the fp32 result
        assert y3.shape == (2, 3, 40) and y3.dtype == dtype
        assert torch.equal(y3, RP.tbe_linear(x3, m, out_dtype=torch.float32).to(dtype))
        assert RP.tbe_linear(x3[:0], m).shape == (0, 3, 40)

    # a corrupt set bit in a padding position is ignored, as the CPU decoder ignores it
    w = (torch.randn(70, 130, generator=g) * 0.02).to(torch.bfloat16)
    w[::3, ::7] = 300.0  # fallbacks
    m = TBEMatrix.from_tensor(w, device="cpu")
    tile = 0 * ((130 + 7) // 8) + 16  # tile row 0, tile col 16: columns 128..135
    m.planes = m.planes.clone()
    m.planes[tile * 3 * 2] |= 1 << 5  # row 0, column 133 > 129: padding
    for layout in ("element", "tile"):
        assert torch.equal(bits(RP.tbe_decode(m, layout=layout)), bits(w)), layout
        y = RP.tbe_linear(torch.ones(1, 130, dtype=torch.bfloat16), m, layout=layout,
                          out_dtype=torch.float32)
        assert torch.allclose(y, w.float().sum(1)[None], rtol=1e-5, atol=1e-3), layout

    # typed errors for bad input and bad configs
    wm = TBEMatrix.from_tensor(torch.ones(16, 64, dtype=torch.bfloat16), device="cpu")
    x = torch.ones(2, 64, dtype=torch.bfloat16)
    bad = [(InputError, lambda: RP.tbe_linear(x.half(), wm)),
           (InputError, lambda: RP.tbe_linear(torch.ones(2, 63, dtype=torch.bfloat16), wm)),
           (InputError, lambda: RP.tbe_linear(torch.ones(129, 64, dtype=torch.bfloat16), wm)),
           (InputError, lambda: RP.tbe_linear(x.to("meta"), wm)),
           (InputError, lambda: RP.tbe_linear(x, TBEMatrix.from_tensor(
               torch.ones(64, dtype=torch.bfloat16), device="cpu"))),
           (InputError, lambda: RP.tbe_linear(x.float().numpy(), wm)),
           (InputError, lambda: RP.tbe_decode(torch.ones(3))),
           (ConfigError, lambda: RP.tbe_linear(x, wm, rows_per_slab=8)),
           (ConfigError, lambda: RP.tbe_linear(x, wm, mode="wmma")),
           (ConfigError, lambda: RP.tbe_linear(x, wm, split_k=0)),
           (ConfigError, lambda: RP.tbe_decode(wm, layout="rows")),
           (ConfigError, lambda: RP.tbe_decode(wm, num_warps=3))]
    for i, (err, fn) in enumerate(bad):
        try:
            fn()
        except err:
            continue
        raise AssertionError(f"bad input {i} did not raise {err.__name__}")
    print("ROWPOP-INTERP-OK")


# --------------------------------------------------------------------------- sm_90 compile
_COMMON = dict(planes="*i32", cov_ptr="*u8", fb_ptr="*i16", cov_off="*i64", fb_off="*i64")


def compile_sm90(kernel, sig, constexprs, num_warps):
    import triton
    from triton.backends.compiler import GPUTarget

    sig = dict(sig, **{k: "constexpr" for k in constexprs})
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def compile_all():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    dec_sig = dict(_COMMON, out="*i16", R="i32", C="i32", n="i32", TC="i32", BC="i32",
                   base="i32")
    lin_sig = dict(x_ptr="*bf16", **_COMMON, y_ptr="*fp32", N="i32", R="i32", C="i32",
                   n="i32", TR="i32", TC="i32", base="i32", stride_xn="i32", stride_ys="i32",
                   stride_yn="i32", blocks_per_split="i32")
    cases = [
        ("decode bf16 element SR16 w4", RP._decode_kernel, dec_sig,
         dict(SR=16, P=3, IS_BF16=True, TILE=False), 4),
        ("decode fp16 tile SR32 w8", RP._decode_kernel, dec_sig,
         dict(SR=32, P=6, IS_BF16=False, TILE=True), 8),
        ("linear bf16 fma BN1 element SR16 w4", RP._linear_kernel, lin_sig,
         dict(SR=16, P=3, IS_BF16=True, BN=1, USE_DOT=False, DOT_F32=False, TILE=False), 4),
        ("linear bf16 dot BN16 tile SR32 w4", RP._linear_kernel, lin_sig,
         dict(SR=32, P=3, IS_BF16=True, BN=16, USE_DOT=True, DOT_F32=False, TILE=True), 4),
        ("linear fp16 dot BN32 element SR64 w8", RP._linear_kernel, dict(lin_sig, x_ptr="*fp16"),
         dict(SR=64, P=6, IS_BF16=False, BN=32, USE_DOT=True, DOT_F32=False, TILE=False), 8),
    ]
    for name, kernel, sig, cx, nw in cases:
        c = compile_sm90(kernel, sig, cx, nw)
        ptx = c.asm["ptx"]
        assert ".target sm_90" in ptx, name
        # the SWAR popcount must have become the hardware instruction
        assert "popc.b32" in ptx, name
        if cx.get("USE_DOT"):
            assert "mma" in ptx, name
        assert c.asm.get("cubin"), name
        print(f"{name}: ptx {len(ptx)} chars, popc x{ptx.count('popc.b32')}, "
              f"shared {c.metadata.shared} B, cubin {len(c.asm['cubin'])} B")
    print("ROWPOP-COMPILE-OK")


if __name__ == "__main__":
    if sys.argv[1] == "interp":
        interp(big="--big" in sys.argv)
    else:
        compile_all()
