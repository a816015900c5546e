"""Run under TRITON_INTERPRET=1 (see test_triton_slab.py): slab kernels vs the CPU codec."""

import torch

from moeflow.compress import triton_tbe_slab as S
from moeflow.compress.triton_tbe import TBEMatrix

torch.manual_seed(0)
CASES = {torch.bfloat16: [(70, 130), (5,)], torch.float16: [(20, 33)]}
for dt, shapes in CASES.items():
    for shape in shapes:
        w = (torch.randn(*shape) * 0.02).to(dt)
        w.view(-1)[::17] *= 1000  # exponents outside the window take the fallback stream
        w.view(-1)[::29] = 0
        m = TBEMatrix.from_tensor(w, device="cpu")
        d = S.tbe_decode(m)
        assert d.shape == w.shape and d.dtype == w.dtype
        assert torch.equal(d.view(torch.int16), w.view(torch.int16)), (dt, shape)
        if len(shape) == 2:
            for n in (1, 3):
                x = torch.randn(n, shape[1]).to(dt)
                y = S.tbe_linear(x, m)
                ref = (x.float() @ w.float().t()).to(dt)
                tol = 1e-2 * ref.float().abs().max().item() + 1e-3
                err = (y.float() - ref.float()).abs().max().item()
                assert err <= tol, (dt, shape, n, err, tol)
print("SLAB-CHECK-OK")
