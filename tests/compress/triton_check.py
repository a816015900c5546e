"""Run by test_triton.py in a subprocess with TRITON_INTERPRET=1 (kept out of this process)."""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1"

import torch  # noqa: E402

from moeflow.compress.triton_tbe import (TBEMatrix, tbe_decode, tbe_encode_torch,  # noqa: E402
                                         tbe_linear)


def bits(t):
    return t.contiguous().view(-1).view(torch.int16)


def main():
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float16):
        for shape in [(70, 130), (64, 64), (5,), (3, 4, 9), (0,)]:
            w = (torch.randn(shape, generator=g) * 0.02).to(dtype)
            if w.numel():
                w.view(-1)[::7] = (torch.randn(w.numel(), generator=g)[::7] * 300).to(dtype)
            a = TBEMatrix.from_tensor(w, "cpu")
            b = tbe_encode_torch(w)
            for f in ("planes", "cov_off", "fb_off", "covered", "fallback"):
                assert torch.equal(getattr(a, f), getattr(b, f)), (dtype, shape, f)
            d = tbe_decode(a)
            assert d.shape == w.shape and torch.equal(bits(d), bits(w)), (dtype, shape)
        # every bit pattern through the GPU decoder (NaN payloads, inf, subnormals)
        allp = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype).reshape(128, 512)
        assert torch.equal(bits(tbe_decode(TBEMatrix.from_tensor(allp))), bits(allp))
        w = (torch.randn(96, 200, generator=g) * 0.02).to(dtype)
        w[1, 2] = 50.0  # fallback values take part in the product
        m = TBEMatrix.from_tensor(w)
        for N, split in [(1, None), (5, 2), (17, 1)]:
            x = torch.randn(N, 200, generator=g).to(dtype)
            y = tbe_linear(x, m, split_k=split)
            ref = x.float() @ w.float().T
            assert y.shape == (N, 96) and y.dtype == dtype
            err = (y.float() - ref).abs().max().item()
            assert err <= 1e-2 * ref.abs().max().item(), (dtype, N, err)
        x3 = torch.randn(2, 3, 200, generator=g).to(dtype)
        assert tbe_linear(x3, m).shape == (2, 3, 96)
    print("TRITON-CHECK-OK")


if __name__ == "__main__":
    sys.exit(main())
