"""Compile the TBE kernels for sm_90 on any machine (no GPU needed) and write what came out.

    python tests/compress/gpu/_sm90.py OUT.json      (without TRITON_INTERPRET)

Run in a child process by test_sm90_compile.py: the tests in this folder decorate the kernels
for the interpreter, which cannot compile them. Writes ``{case: {"ptx", "shared",
"cubin_bytes"}}``.
"""

from __future__ import annotations

import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget

from moeflow.compress.gpu import decode, linear
from moeflow.compress.gpu import experimental_unit as U

# arguments Triton assumes 16-byte aligned (divisible by 16) at a real launch
_ALIGNED = (
    "x_ptr",
    "planes",
    "cov_ptr",
    "fb_ptr",
    "cov32",
    "fb32",
    "cov_off",
    "fb_off",
    "tab",
    "y_ptr",
    "out",
    "out32",
    "C",
    "TC",
    "R",
    "stride_xn",
    "stride_ys",
    "stride_yn",
)


def compile_sm90(kernel, sig, constexprs, num_warps):
    names = list(kernel.arg_names)
    sig = dict(sig, **{k: "constexpr" for k in constexprs})
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in _ALIGNED if a in names}
    src = triton.compiler.ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps))


def cases():
    streams = dict(planes="*i32", cov_ptr="*u8", fb_ptr="*i16", cov_off="*i64", fb_off="*i64")
    dec = dict(streams, out="*i16", R="i32", C="i32", n="i32", base="i32")
    lin = dict(
        x_ptr="*bf16",
        **streams,
        y_ptr="*fp32",
        N="i32",
        R="i32",
        C="i32",
        TR="i32",
        TC="i32",
        base="i32",
        stride_xn="i32",
        stride_ys="i32",
        stride_yn="i32",
        blocks_per_split="i32",
    )
    u_streams = dict(
        planes="*i32", cov32="*i32", fb32="*i32", fb_ptr="*i16", cov_off="*i64", fb_off="*i64"
    )
    u_dec = dict(u_streams, out32="*i32", R="i32", C="i32", TC="i32", BC="i32", tab="*i32")
    u_lin = dict(
        x_ptr="*bf16",
        **u_streams,
        tab="*i32",
        y_ptr="*fp32",
        N="i32",
        R="i32",
        C="i32",
        TC="i32",
        BC="i32",
        stride_xn="i32",
        stride_ys="i32",
        stride_yn="i32",
        blocks_per_split="i32",
    )
    hw = dict(HW=True, NEG=False)
    return {
        "decode bf16": (decode.tbe_decode_kernel, dec, dict(P=3, IS_BF16=True), 4),
        "decode fp16": (decode.tbe_decode_kernel, dec, dict(P=6, IS_BF16=False), 4),
        "linear bf16 BN16": (
            linear.tbe_linear_kernel,
            lin,
            dict(P=3, IS_BF16=True, BN=16, DOT_F32=False),
            4,
        ),
        "unit decode rows bf16 b1": (
            U.decode_rows_kernel,
            u_dec,
            dict(RB=1, P=3, IS_BF16=True, **hw),
            2,
        ),
        "unit decode rows fp16 b2": (
            U.decode_rows_kernel,
            u_dec,
            dict(RB=2, P=6, IS_BF16=False, **hw),
            4,
        ),
        "unit decode units bf16 s64": (
            U.decode_units_kernel,
            u_dec,
            dict(SR=64, P=3, IS_BF16=True, **hw),
            8,
        ),
        "unit fma bf16 BN1 b1": (
            U.linear_rows_kernel,
            u_lin,
            dict(RB=1, BN=1, P=3, IS_BF16=True, **hw),
            2,
        ),
        "unit fma bf16 BN8 b2": (
            U.linear_rows_kernel,
            u_lin,
            dict(RB=2, BN=8, P=3, IS_BF16=True, **hw),
            4,
        ),
        "unit dot bf16 BN16 b1": (
            U.linear_dot_kernel,
            u_lin,
            dict(RB=1, BN=16, P=3, IS_BF16=True, DOT_F32=False, **hw),
            2,
        ),
    }


def main(out_path: str, names: list[str]) -> int:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: interpreted kernels do not compile", file=sys.stderr)
        return 2
    result = {}
    for name, (kernel, sig, cx, nw) in cases().items():
        if names and name not in names:
            continue
        c = compile_sm90(kernel, sig, cx, nw)
        result[name] = dict(
            ptx=c.asm["ptx"], shared=c.metadata.shared, cubin_bytes=len(c.asm.get("cubin") or b"")
        )
    with open(out_path, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
