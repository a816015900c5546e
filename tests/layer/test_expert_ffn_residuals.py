"""ExpertFFN: the saved-residual forward and the hand-written backward on regrouped rows
equal autograd through the single-device expert kernels, for every activation pair."""

from __future__ import annotations

import pytest
import torch

from moeflow.layer.experts import ExpertFFN, experts_eager

PAIRS = [("silu", True), ("gelu_tanh", False), ("gelu", True), ("relu", False), ("gelu", False)]


@pytest.mark.parametrize("activation,gated", PAIRS)
@pytest.mark.parametrize("kernel", ["auto", "grouped_mm", "bmm", "loop"])
def test_residual_backward_on_other_chunks_equals_autograd(activation, gated, kernel):
    if kernel == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no _grouped_mm")
    # grouped_mm runs fp32 on CPU; the others fp64 (tight tolerances)
    dt = torch.float32 if kernel == "grouped_mm" else torch.float64
    tol = 1e-4 if dt == torch.float32 else 1e-9
    torch.manual_seed(0)
    E, D, F = 4, 8, 12
    counts = torch.tensor([5, 0, 7, 3])
    N = int(counts.sum())
    x = torch.randn(N, D, dtype=dt)
    w_in = torch.randn(E, 2 * F if gated else F, D, dtype=dt)
    w_out = torch.randn(E, D, F, dtype=dt)
    gy = torch.randn(N, D, dtype=dt)

    xr, wi, wo = (t.clone().requires_grad_(True) for t in (x, w_in, w_out))
    y_ref = experts_eager(xr, counts, wi, wo, activation, gated, "loop")
    y_ref.backward(gy)

    ffn = ExpertFFN(activation, gated, kernel)
    y, saved = ffn.forward_saving(x, counts, w_in, w_out)
    assert torch.allclose(y, y_ref, atol=tol, rtol=tol)
    assert [t.shape[0] for t in saved] == [N] * 3
    # backward in two chunks that split every expert's rows differently from the forward
    start = torch.cumsum(counts, 0) - counts
    halves = [
        torch.cat([start[e] + torch.arange(n // 2) for e, n in enumerate(counts.tolist())]),
        torch.cat([start[e] + torch.arange(n // 2, n) for e, n in enumerate(counts.tolist())]),
    ]
    g_x = torch.zeros_like(x)
    g_in, g_out = torch.zeros_like(w_in), torch.zeros_like(w_out)
    for rows, sizes in zip(halves, (counts // 2, counts - counts // 2)):
        parts = [t.index_select(0, rows) for t in saved]
        gx, gi, go = ffn.backward(gy.index_select(0, rows), parts, sizes, w_in, w_out, x.dtype)
        g_x.index_copy_(0, rows, gx)
        g_in += gi
        g_out += go
    for got, want in ((g_x, xr.grad), (g_in, wi.grad), (g_out, wo.grad)):
        assert torch.allclose(got, want, atol=tol, rtol=tol), (got - want).abs().max()
