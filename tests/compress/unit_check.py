"""Checks of the tile-row TBE kernels, run by test_triton_unit.py in a subprocess.

    TRITON_INTERPRET=1 python unit_check.py interp    bit-exact decode, fused GEMM, errors
    python unit_check.py compile                      PTX/cubin for sm_90 (hardware PRMT/POPC)
"""

import os
import sys

import numpy as np
import torch

from moeflow.compress import tbe
from moeflow.compress import triton_tbe_unit as U
from moeflow.compress.container import CompressedTensor
from moeflow.compress.triton_tbe import TBEMatrix
from moeflow.errors import ConfigError, InputError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rowpop_check  # noqa: E402
from rowpop_check import bits, hard_weights  # noqa: E402


def most_fallbacks_in_a_unit(w) -> int:
    """Most fallback weights among the 8 of any tile row (the kernels' slow path is > 4)."""
    ct = CompressedTensor.from_tensor(w, "tbe")
    p = tbe.parse(ct.payload, ct.dtype, ct.shape)
    R, C = p.rows, p.cols
    TR, TC = p.tiles
    planes = p.planes.reshape(TR, TC, p.planes_per_tile)
    cov = planes[:, :, 0] | planes[:, :, 1] | planes[:, :, 2]          # [TR, TC] uint64
    rows = np.arange(8, dtype=np.uint64)
    byte = (cov[:, :, None] >> (rows * np.uint64(8))) & np.uint64(0xFF)  # [TR, TC, 8]
    ncov = np.unpackbits(byte.astype(np.uint8)[..., None], axis=-1).sum(-1)
    return int((8 - ncov).transpose(0, 2, 1).reshape(TR * 8, TC)[:R].max())  # C % 8 == 0


def check_decode(w, **kw):
    m = TBEMatrix.from_tensor(w, device="cpu")
    assert U.supported(m), (tuple(w.shape), m.base)
    d = U.tbe_decode(m, **kw)
    assert d.shape == w.shape and d.dtype == w.dtype, (d.shape, d.dtype)
    assert torch.equal(bits(d), bits(w)), (w.dtype, tuple(w.shape), kw)
    return m


def check_gemm(w, m, N, g, **kw):
    rowpop_check.check_gemm(w, m, N, g, linear=U.tbe_linear, **kw)


def finite(w):
    return torch.where(torch.isfinite(w) & (w.float().abs() < 1e4), w, torch.zeros_like(w))


def low_exponents(shape, g):
    """bf16 values whose exponents cluster at 0..6 (subnormals and the smallest normals), so
    the window starts at base -1, plus 10% of arbitrary bit patterns as fallbacks."""
    n = int(np.prod(shape))
    e = torch.randint(0, 7, (n,), generator=g)
    raw = (torch.randint(0, 2, (n,), generator=g) << 15) | (e << 7) | torch.randint(
        0, 128, (n,), generator=g)
    wild = torch.rand(n, generator=g) < 0.1
    raw = torch.where(wild, torch.randint(0, 65536, (n,), generator=g), raw)
    return raw.to(torch.int32).to(torch.int16).view(torch.bfloat16).reshape(shape)


def interp(big=False):
    assert os.environ.get("TRITON_INTERPRET") == "1"
    g = torch.Generator().manual_seed(0)
    if big:  # every bf16 bit pattern once (NaN payloads, +-inf, +-0, subnormals)
        allp = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        for kw in (dict(layout="rows"), dict(layout="units", rows_per_slab=32)):
            m = check_decode(allp.reshape(256, 256), **kw)
            assert m.base == -1
    # window base -1 (the NEG path)
    m = check_decode(low_exponents((16, 64), g), layout="rows")
    assert m.base == -1
    check_decode(low_exponents((8, 72), g), layout="units", rows_per_slab=16)
    # many fallbacks and specials: some tile rows take the slow path (more than 4 fallbacks)
    w = hard_weights((72, 136), torch.bfloat16, g)
    assert most_fallbacks_in_a_unit(w) > 4
    for kw in ((dict(layout="rows"), dict(layout="rows", block_rows=2),
                dict(layout="units", rows_per_slab=64, num_warps=8)) if big else
               (dict(layout="rows"), dict(layout="units", rows_per_slab=64, num_warps=8))):
        check_decode(w, **kw)
    h = hard_weights((130, 200) if big else (66, 80), torch.float16,
                     torch.Generator().manual_seed(1))
    assert most_fallbacks_in_a_unit(h) > 4
    for kw in (dict(layout="rows", block_rows=4), dict(layout="units", rows_per_slab=16)):
        check_decode(h, **kw)
    # fewer rows than a block, columns not a multiple of 64, leading dimensions flattened
    check_decode(hard_weights((3, 2, 24), torch.bfloat16, g), layout="rows")
    # Gaussian weights: no unit needs the slow path
    gw = (torch.randn(64, 128, generator=g) * 0.02).to(torch.bfloat16)
    assert most_fallbacks_in_a_unit(gw) <= 4
    check_decode(gw, layout="rows")
    if big:
        check_decode(gw, layout="units", rows_per_slab=32)

    # fused GEMM: FMA passes of up to 8 tokens, split-K, two blocks per program, decode + mm
    wf = finite(hard_weights((24, 136), torch.bfloat16, g))
    mf = TBEMatrix.from_tensor(wf, device="cpu")
    check_gemm(wf, mf, 1, g)
    check_gemm(wf, mf, 3, g, split_k=2, block_rows=2)
    check_gemm(wf, mf, 9, g, mode="fma")
    check_gemm(wf, mf, 5, g, mode="decode")
    check_gemm(wf, mf, 17, g, mode="dot", split_k=2)  # 17 tiles: the last pair is half empty
    hf = finite(hard_weights((20, 64), torch.float16, g))
    check_gemm(hf, TBEMatrix.from_tensor(hf, device="cpu"), 8, g)
    x3 = torch.randn(2, 3, 136, generator=g).to(torch.bfloat16)
    assert U.tbe_linear(x3, mf).shape == (2, 3, 24)
    assert U.tbe_linear(x3[:0], mf).shape == (0, 3, 24)

    # typed errors
    one_d = TBEMatrix.from_tensor(torch.randn(100).to(torch.bfloat16), device="cpu")
    odd_c = TBEMatrix.from_tensor(torch.randn(4, 12).to(torch.bfloat16), device="cpu")
    assert not U.supported(one_d) and not U.supported(odd_c)
    bad = [(InputError, lambda: U.tbe_decode(one_d)),
           (InputError, lambda: U.tbe_decode(odd_c)),
           (InputError, lambda: U.tbe_decode(wf)),
           (ConfigError, lambda: U.tbe_decode(mf, layout="cols")),
           (ConfigError, lambda: U.tbe_decode(mf, layout="units", rows_per_slab=8)),
           (ConfigError, lambda: U.tbe_decode(mf, block_rows=3)),
           (ConfigError, lambda: U.tbe_decode(mf, num_warps=3)),
           (ConfigError, lambda: U.tbe_linear(x3, mf, mode="mma")),
           (ConfigError, lambda: U.tbe_linear(x3, mf, split_k=0)),
           (InputError, lambda: U.tbe_linear(x3.half(), mf)),
           (InputError, lambda: U.tbe_linear(torch.zeros(129, 136, dtype=torch.bfloat16), mf))]
    for i, (err, fn) in enumerate(bad):
        try:
            fn()
        except err:
            continue
        raise AssertionError(f"bad input {i} did not raise {err.__name__}")
    print("UNIT-INTERP-OK")


# --------------------------------------------------------------------------- sm_90 compile
_STREAMS = dict(planes="*i32", cov32="*i32", fb32="*i32", fb_ptr="*i16", cov_off="*i64",
                fb_off="*i64")
_ALIGNED = ("x_ptr", "planes", "cov32", "fb32", "fb_ptr", "cov_off", "fb_off", "tab", "y_ptr",
            "out32", "C", "TC", "R", "stride_xn", "stride_ys", "stride_yn")


def compile_sm90(kernel, sig, constexprs, num_warps):
    """Compile for sm_90 with the 16-byte alignment Triton assumes for real launches."""
    import triton
    from triton.backends.compiler import GPUTarget

    names = list(kernel.arg_names)
    sig = dict(sig, **{k: "constexpr" for k in constexprs})
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in _ALIGNED if a in names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs,
                                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def compile_all():
    assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
    dec = dict(_STREAMS, cov_off="*i64", fb_off="*i64", out32="*i32", R="i32", C="i32",
               TC="i32", BC="i32", tab="*i32")
    lin = dict(x_ptr="*bf16", **_STREAMS, tab="*i32", y_ptr="*fp32", N="i32", R="i32",
               C="i32", TC="i32", BC="i32", stride_xn="i32", stride_ys="i32", stride_yn="i32",
               blocks_per_split="i32")
    cases = [
        ("decode rows bf16 b1", U._decode_rows_kernel, dec,
         dict(RB=1, P=3, IS_BF16=True, HW=True, NEG=False), 2),
        ("decode rows fp16 b2", U._decode_rows_kernel, dec,
         dict(RB=2, P=6, IS_BF16=False, HW=True, NEG=False), 4),
        ("decode units bf16 s64", U._decode_units_kernel, dec,
         dict(SR=64, P=3, IS_BF16=True, HW=True, NEG=False), 8),
        ("linear bf16 BN1 b1", U._linear_rows_kernel, lin,
         dict(RB=1, BN=1, P=3, IS_BF16=True, HW=True, NEG=False), 2),
        ("linear bf16 BN8 b2", U._linear_rows_kernel, lin,
         dict(RB=2, BN=8, P=3, IS_BF16=True, HW=True, NEG=False), 4),
        ("linear dot bf16 BN16 b1", U._linear_dot_kernel, lin,
         dict(RB=1, BN=16, P=3, IS_BF16=True, HW=True, NEG=False, DOT_F32=False), 2),
    ]
    for name, kernel, sig, cx, nw in cases:
        c = compile_sm90(kernel, sig, cx, nw)
        ptx = c.asm["ptx"]
        assert ".target sm_90" in ptx, name
        # the named instructions, not their interpreter emulations
        assert "prmt.b32" in ptx and "popc.b32" in ptx, name
        if "decode" in name:  # one 16-byte store per tile row
            assert "st.global.v4.b32" in ptx, name
        if "dot" in name:  # tensor cores
            assert "mma" in ptx, name
        assert c.asm.get("cubin"), name
        print(f"{name}: ptx {len(ptx)} chars, prmt x{ptx.count('prmt.b32')}, "
              f"shared {c.metadata.shared} B, cubin {len(c.asm['cubin'])} B")
    print("UNIT-COMPILE-OK")


if __name__ == "__main__":
    if sys.argv[1] == "interp":
        interp(big="--big" in sys.argv)
    else:
        compile_all()
