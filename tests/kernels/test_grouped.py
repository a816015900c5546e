"""Grouped expert FFN kernels against the plain per-expert loop (forward and backward)."""

from __future__ import annotations

import pytest
import torch

from moeflow.errors import InputError
from moeflow.kernels import expert_ffn, resolve_impl

IMPLS = ["grouped_mm", "bmm"]
D, F_, E = 24, 20, 5


def _weights(activation, dtype, seed=0, E=E):
    g = torch.Generator().manual_seed(seed)
    rows = 2 * F_ if activation == "swiglu" else F_
    w_in = (torch.randn(E, rows, D, generator=g) * D**-0.5).to(dtype)
    w_out = (torch.randn(E, D, F_, generator=g) * F_**-0.5).to(dtype)
    return w_in, w_out


COUNTS = {
    "mixed": [3, 0, 7, 1, 4],
    "zeros_and_gaps": [0, 5, 0, 0, 2],
    "all_to_one": [0, 0, 13, 0, 0],
    "all_to_last": [0, 0, 0, 0, 9],
    "empty": [0, 0, 0, 0, 0],
}


def _run(impl, x, counts, w_in, w_out, activation, gy):
    x = x.clone().requires_grad_()
    w_in = w_in.clone().requires_grad_()
    w_out = w_out.clone().requires_grad_()
    y = expert_ffn(x, counts, w_in, w_out, activation, impl)
    (y.float() * gy.float()).sum().backward()
    # An empty batch may leave a gradient undefined: that means zero.
    return tuple(
        t if t is not None else torch.zeros_like(ref)
        for t, ref in ((y, y), (x.grad, x), (w_in.grad, w_in), (w_out.grad, w_out))
    )


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("counts_name", sorted(COUNTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_impl_matches_loop(impl, activation, counts_name, dtype):
    counts = torch.tensor(COUNTS[counts_name])
    N = int(counts.sum())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=g).to(dtype)
    gy = torch.randn(N, D, generator=g).to(dtype)
    w_in, w_out = _weights(activation, dtype)
    ref = _run("loop", x, counts, w_in, w_out, activation, gy)
    got = _run(impl, x, counts, w_in, w_out, activation, gy)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    names = ("y", "grad x", "grad w_in", "grad w_out")
    for name, a, b in zip(names, got, ref):
        assert a.dtype == dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), **tol, msg=name)
    if N:
        assert ref[0].abs().max() > 0
    # Experts that got no rows get exactly zero weight gradient.
    for e in torch.nonzero(counts == 0).flatten().tolist():
        assert got[2][e].abs().max() == 0 and got[3][e].abs().max() == 0


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
def test_only_input_grad_needed(impl):
    """Frozen weights (inference-style fine-tuning of other parts): only x gets a gradient."""
    counts = torch.tensor([2, 3, 0, 1, 4])
    x = torch.randn(10, D, requires_grad=True)
    w_in, w_out = _weights("swiglu", torch.float32)
    y = expert_ffn(x, counts, w_in, w_out, "swiglu", impl)
    y.sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    expert_ffn(x_ref, counts, w_in, w_out, "swiglu", "loop").sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
def test_f_slices_sum_to_full(impl):
    """ESP: results over F-slices of the weights add up to the full result."""
    counts = torch.tensor([4, 1, 0, 6, 2])
    x = torch.randn(13, D)
    w_in, w_out = _weights("swiglu", torch.float32)
    full = expert_ffn(x, counts, w_in, w_out, "swiglu", impl)
    half = F_ // 2
    parts = []
    for sl in (slice(0, half), slice(half, F_)):
        wi = torch.cat([w_in[:, sl], w_in[:, F_ + sl.start : F_ + sl.stop]], dim=1)
        parts.append(expert_ffn(x, counts, wi, w_out[:, :, sl], "swiglu", impl))
    torch.testing.assert_close(parts[0] + parts[1], full, atol=1e-5, rtol=1e-5)


def test_noncontiguous_and_larger_shapes_match_loop():
    E2 = 8
    counts = torch.tensor([40, 0, 17, 90, 3, 0, 55, 11])
    x = torch.randn(int(counts.sum()), 2 * D)[:, ::2]  # non-contiguous rows
    w_in, w_out = _weights("swiglu", torch.float32, E=E2)
    ref = expert_ffn(x, counts, w_in, w_out, "swiglu", "loop")
    for impl in ("auto", *IMPLS):
        torch.testing.assert_close(
            expert_ffn(x, counts, w_in, w_out, "swiglu", impl), ref, atol=1e-5, rtol=1e-5
        )


def test_resolve_impl_and_bad_inputs():
    x = torch.randn(3, D)
    assert resolve_impl("loop", x) == "loop"
    assert resolve_impl("auto", x) in ("grouped_mm", "bmm")
    assert resolve_impl("auto", x.half()) in ("grouped_mm", "bmm")
    w_in, w_out = _weights("swiglu", torch.float32)
    with pytest.raises(InputError, match="impl"):
        expert_ffn(x, torch.tensor([3, 0, 0, 0, 0]), w_in, w_out, "swiglu", "fast")
    with pytest.raises(InputError, match="activation"):
        expert_ffn(x, torch.tensor([3, 0, 0, 0, 0]), w_in, w_out, "relu")
    with pytest.raises(InputError, match="counts_E"):
        expert_ffn(x, torch.tensor([3, 0]), w_in, w_out)
    with pytest.raises(InputError, match="2-D"):
        expert_ffn(x[None], torch.tensor([3, 0, 0, 0, 0]), w_in, w_out)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("lowp_native", [True, False])
def test_bf16_compute_paths_match_loop(impl, lowp_native, monkeypatch):
    """bf16 runs natively (CPUs with bf16 dot products) or through fp32 GEMMs (AVX2-only):
    both give bf16 results and gradients close to the loop. F=20 makes bf16 rows 40 bytes,
    which also exercises the unaligned per-expert mm fallback of grouped_mm."""
    from moeflow.kernels import grouped

    monkeypatch.setattr(grouped, "_cpu_has_fast_lowp", lambda: lowp_native)
    x = torch.randn(15, D).bfloat16()
    assert grouped.compute_dtype(x) == (torch.bfloat16 if lowp_native else torch.float32)
    counts = torch.tensor(COUNTS["mixed"])
    gy = torch.randn(15, D).bfloat16()
    w_in, w_out = _weights("swiglu", torch.bfloat16)
    ref = _run("loop", x, counts, w_in, w_out, "swiglu", gy)
    got = _run(impl, x, counts, w_in, w_out, "swiglu", gy)
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("impl", IMPLS)
def test_upcast_weight_cache_follows_inplace_updates(impl, monkeypatch):
    """bf16 via fp32 GEMMs caches the fp32 weights: an in-place update (optimizer step) must be
    seen by the next call, and an update between forward and backward must raise."""
    from moeflow.kernels import grouped

    monkeypatch.setattr(grouped, "_cpu_has_fast_lowp", lambda: False)
    counts = torch.tensor([3, 2, 0, 4, 1])
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(4)).bfloat16()
    w_in, w_out = _weights("swiglu", torch.bfloat16)
    w_in.requires_grad_()
    y1 = expert_ffn(x, counts, w_in, w_out, "swiglu", impl)
    with torch.no_grad():
        w_in.mul_(-1.5)
    y2 = expert_ffn(x, counts, w_in, w_out, "swiglu", impl)
    # fp32 GEMMs on the bf16 values: equal to an fp32 loop up to the final bf16 rounding.
    ref2 = expert_ffn(x.float(), counts, w_in.detach().float(), w_out.float(), "swiglu", "loop")
    torch.testing.assert_close(y2.float(), ref2, atol=1e-2, rtol=1e-2)
    assert not torch.allclose(y1.float(), y2.float(), atol=1e-2)
    with torch.no_grad():
        w_in.mul_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y2.sum().backward()
    grouped.clear_weight_cache()
    assert not grouped._UPCAST.entries


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_inplace_activation_matches_loop(impl, activation, dtype):
    """Without any gradient the activation overwrites the pre-activation buffer."""
    counts = torch.tensor(COUNTS["mixed"])
    x = torch.randn(int(counts.sum()), D).to(dtype)
    w_in, w_out = _weights(activation, dtype)
    with torch.no_grad():
        ref = expert_ffn(x, counts, w_in, w_out, activation, "loop")
        got = expert_ffn(x, counts, w_in, w_out, activation, impl)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), ref.float(), **tol)
