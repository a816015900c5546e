"""The planner's bytes for an AdaTopK link equal what the geo pipeline puts on the wire: the
forward's top-k values with their int32 positions, the backward's values at those positions
(no positions, no size header: the receiver's buffers are sized from the shape and density),
measured by calling the runtime's encode path on the cut tensors of a traced model."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow.geo import pipeline as gp
from moeflow.plan import geo as plan_geo

SMALL = dict(dim=32, layers=2, heads=2, seq_len=16, experts=4, ffn=64, microbatch_size=2)


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.fixture(scope="module")
def traced():
    job = gp.GeoJob(**SMALL, microbatches=1, steps=1, stages=2, max_bytes=200_000)
    return gp.trace_job(job)[1]


@pytest.mark.parametrize("density", [1 / 16, 0.25, 0.5, 1.0])
def test_planner_wire_bytes_equal_the_runtime_encode(traced, density):
    job = gp.GeoJob(
        **SMALL, microbatches=1, steps=1, stages=2, densities=(density,), max_bytes=200_000
    )
    bounds = gp.even_bounds(len(traced.ops.nodes), 2)
    specs = gp._cut_specs(traced, bounds, job)
    send, recv = (gp._StageRunner(job, s, traced, bounds, specs) for s in (0, 1))
    torch.manual_seed(0)
    checked = 0
    for name in send.out_names:
        shape, dtype = specs[name]
        numel = math.prod(shape)
        # the planner prices density * numel entries; the runtime sends ceil(.) >= 1 of them
        if not dtype.is_floating_point or (density * numel) % 1:
            continue
        assert dtype == torch.float32  # the planner's dense bytes are fp32
        x = torch.randn(shape)
        fwd = send._encode(name, x, density)
        bufs = recv._buffers(name, density)  # what the receiver reads: no header
        assert [(t.shape, t.dtype) for t in bufs] == [(t.shape, t.dtype) for t in fwd]
        for b, t in zip(bufs, fwd, strict=True):
            b.copy_(t)
        _, positions = recv._decode(name, bufs, density)
        bwd = recv._encode_grad(torch.randn(shape), positions)
        grad_bufs = send._grad_buffers(name, density)
        assert [(t.shape, t.dtype) for t in grad_bufs] == [(t.shape, t.dtype) for t in bwd]
        want = plan_geo.wire_bytes(numel * dtype.itemsize, density)
        assert (_nbytes(fwd), _nbytes(bwd)) == want
        if density < 1:  # values and int32 positions forward, values only backward
            assert want == (8 * density * numel, 4 * density * numel)
        checked += 1
    assert checked >= 2
