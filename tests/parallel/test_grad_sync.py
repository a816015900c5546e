"""Flat-bucket gradient all-reduce: the packing (pure) and the sums over gloo ranks."""

from __future__ import annotations

import pytest
import torch

from moeflow.comm.collectives import flat_buckets
from moeflow.errors import ConfigError
from tests._dist import run_ranks


def test_buckets_keep_order_split_by_dtype_and_respect_the_cap():
    f32 = [torch.zeros(4) for _ in range(5)]  # 16 bytes each
    f64 = torch.zeros(3, dtype=torch.float64)  # 24 bytes
    big = torch.zeros(40)  # 160 bytes: larger than a bucket
    tensors = [f32[0], f32[1], f64, f32[2], big, f32[3], f32[4]]
    buckets = flat_buckets(tensors, bucket_bytes=40)
    ids = [[id(t) for t in b] for b in buckets]
    assert ids == [
        [id(f32[0]), id(f32[1])],
        [id(f64)],
        [id(f32[2])],
        [id(big)],
        [id(f32[3]), id(f32[4])],
    ]
    # every tensor once, and one bucket per dtype when the cap is large
    assert sorted(map(id, sum(buckets, []))) == sorted(map(id, tensors))
    assert [len(b) for b in flat_buckets(tensors)] == [6, 1]
    with pytest.raises(ConfigError, match="bucket_bytes"):
        flat_buckets(tensors, bucket_bytes=0)


def _reduce(rank, world):
    from moeflow.comm.collectives import reduce_gradients

    out = {}
    for op in ("sum", "mean"):
        for bucket_bytes in (8, 1 << 20):  # one tensor per bucket / one bucket
            a = torch.nn.Parameter(torch.zeros(2, 3))
            b = torch.nn.Parameter(torch.zeros(5, dtype=torch.float64))
            unused = torch.nn.Parameter(torch.zeros(2))  # no gradient on any rank
            expert = torch.nn.Parameter(torch.zeros(4))  # rank-unique: scaled, not summed
            a.grad = torch.full((2, 3), float(rank + 1))
            b.grad = torch.arange(5, dtype=torch.float64) * (rank + 1)
            expert.grad = torch.full((4,), 10.0 * (rank + 1))
            reduce_gradients(
                [a, b, unused, expert],
                [a, b, unused],
                None,
                op=op,
                timeout_s=20,
                bucket_bytes=bucket_bytes,
            )
            out[(op, bucket_bytes)] = (
                a.grad.clone(),
                b.grad.clone(),
                unused.grad.clone(),
                expert.grad.clone(),
                b.grad.dtype,
            )
    return out


@pytest.mark.dist
def test_reduce_gradients_sums_replicated_and_scales_all_world3():
    res = run_ranks(_reduce, 3, timeout_s=60)
    s = sum(r + 1 for r in range(3))  # 6
    for rank, out in enumerate(res):
        for (op, _), (a, b, unused, expert, b_dtype) in out.items():
            div = 3 if op == "mean" else 1
            assert torch.equal(a, torch.full((2, 3), s / div))
            assert b_dtype == torch.float64
            assert torch.equal(b, torch.arange(5, dtype=torch.float64) * s / div)
            assert torch.equal(unused, torch.zeros(2))
            assert torch.equal(expert, torch.full((4,), 10.0 * (rank + 1) / div))
    with pytest.raises(ConfigError, match="'mean' or 'sum'"):
        from moeflow.comm.collectives import reduce_gradients

        reduce_gradients([], [], None, op="avg", timeout_s=1)


def _model_vs_layer(rank, world):
    """runtime.data_parallel.sync_gradients on a model holding an ExpertParallel layer gives
    the gradients of ExpertParallel.sync_gradients: the same function behind both."""
    from moeflow.config import MoEConfig
    from moeflow.layer.moe import MoELayer
    from moeflow.parallel import ExpertParallel
    from moeflow.parallel.data_parallel import sync_gradients

    torch.manual_seed(0)
    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, top_k=2, num_shared_experts=1)
    ep = ExpertParallel(MoELayer(cfg), timeout_s=20)
    torch.manual_seed(1 + rank)
    ep(torch.randn(6, 8)).square().sum().backward()
    local = {k: p.grad.clone() for k, p in ep.named_parameters() if p.grad is not None}
    ep.sync_gradients("mean", bucket_bytes=64)  # several buckets
    by_layer = {k: p.grad.clone() for k, p in ep.named_parameters()}
    for k, p in ep.named_parameters():  # back to the local gradients
        p.grad = local[k].clone() if k in local else None
    sync_gradients(torch.nn.Sequential(ep), None, "mean", timeout_s=20)
    by_model = {k: p.grad for k, p in ep.named_parameters()}
    changed = any(not torch.equal(by_layer[k], local[k]) for k in local)
    return changed, {k: bool(torch.equal(by_layer[k], by_model[k])) for k in by_layer}


@pytest.mark.dist
def test_model_sync_matches_layer_sync_world2():
    for changed, same in run_ranks(_model_vs_layer, 2, timeout_s=60):
        assert changed  # the sync did something
        assert same and all(same.values()), same


def test_master_weights_step_in_fp32_and_round_into_the_bf16_model():
    """MasterWeights: the model runs in bf16 (parameters and floating buffers), the optimizer
    steps fp32 masters, and an update smaller than bf16's resolution still accumulates in the
    masters (what the fp32 copy is for)."""
    from moeflow.parallel.data_parallel import MasterWeights

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_buffer("scale", torch.ones(4))
    ref = [p.detach().clone() for p in model.parameters()]
    masters = MasterWeights(model, torch.bfloat16)
    ids = [id(p) for p in model.parameters()]
    assert [id(p) for p in masters.model_params] == ids  # the same Parameter objects
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert model.scale.dtype == torch.bfloat16
    assert all(m.dtype == torch.float32 for m in masters.parameters())
    assert all(torch.equal(m, r) for m, r in zip(masters.parameters(), ref))
    opt = torch.optim.SGD(masters.parameters(), lr=1.0)
    w, m = model[0].weight, masters.parameters()[0]
    with torch.no_grad():
        m.fill_(1.0)
        w.fill_(1.0)

    def steps(n):  # SGD steps of +2**-13: below half of bf16's spacing at 1.0 (2**-7)
        for _ in range(n):
            for p in model.parameters():
                p.grad = torch.full_like(p, -(2.0**-13))
            masters.step(opt)
            assert all(p.grad is None for p in model.parameters())

    steps(8)
    assert torch.all(m == 1.0 + 2.0**-10)  # the fp32 master keeps every small update
    assert torch.all(w == 1.0)  # the bf16 copy alone would have lost them
    steps(56)
    assert torch.all(m == 1.0 + 2.0**-7) and torch.all(w == 1.0 + 2.0**-7)
    y = model(torch.randn(2, 4, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype"):
        MasterWeights(model, torch.int8)
