"""Analytic FLOPs against FlopCounterMode, the grouped-GEMM formula, MFU."""

import pytest
import torch

from moeflow.apps.bench import Setting, Shape, build_workload, count_flops, step_flops
from moeflow.apps.bench.flops import active_params, grouped_mm_flop, mfu, moe_flops
from moeflow.apps.bench.workloads import model_dims, moe_layers
from moeflow.config import MoEConfig

TINY = {
    "dim": 32,
    "num_layers": 1,
    "num_heads": 4,
    "num_experts": 4,
    "top_k": 2,
    "ffn_hidden_size": 64,
}

has_grouped_mm = pytest.mark.skipif(
    not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm is not in this torch"
)


def _routed(w):
    return [int(m.last_counts_E.sum()) for m in moe_layers(w.model)]


@pytest.mark.parametrize("kind", ["demo", "decoder"])
@pytest.mark.parametrize("kernel", ["grouped_mm", "loop"])
def test_train_step_flops_match_flop_counter(kind, kernel):
    """Forward plus backward of the whole model: the analytic count (routed tokens) equals
    what FlopCounterMode counts from the operators that ran, exactly."""
    B, L = 2, 16
    w = build_workload(kind, "train", Setting(kernel=kernel), Shape(batch=B, seq_len=L), dims=TINY)

    def step():
        w.loss(w.logits(w.ids_BL)).backward()

    counted, per_op = count_flops(step)
    want = step_flops(
        model_dims(w), batch=B, q_len=L, kv_len=L, train=True, routed_per_layer=_routed(w)
    )
    assert counted == want["total"]
    if kernel == "grouped_mm" and hasattr(torch, "_grouped_mm"):
        assert per_op.get("aten._grouped_mm", 0) > 0  # the registered formula was used


def test_decode_step_flops_match_flop_counter():
    """A cached decode step: one query per sequence against L+1 keys."""
    B, L = 3, 12
    w = build_workload("decoder", "decode", Setting(), Shape(batch=B, seq_len=L), dims=TINY)
    w.before_step()
    counted, _ = count_flops(lambda: w.decode_forward())
    want = step_flops(
        model_dims(w), batch=B, q_len=1, kv_len=L + 1, train=False, routed_per_layer=_routed(w)
    )
    assert counted == want["total"] == sum(want["forward"].values())


def test_padded_bmm_counts_more_than_routed():
    """The bmm kernel pads every expert to the largest count: more hardware FLOPs than the
    routed model FLOPs, never fewer."""
    B, L = 2, 16
    w = build_workload("demo", "train", Setting(kernel="bmm"), Shape(batch=B, seq_len=L), dims=TINY)
    counted, _ = count_flops(lambda: w.loss(w.logits(w.ids_BL)).backward())
    want = step_flops(
        model_dims(w), batch=B, q_len=L, kv_len=L, train=True, routed_per_layer=_routed(w)
    )["total"]
    assert counted >= want


@has_grouped_mm
@pytest.mark.parametrize("case", ["2d3d", "2d2d", "3d3d"])
def test_grouped_mm_formula_against_direct_calls(case):
    """Each operand layout of torch._grouped_mm, counted by FlopCounterMode through the
    registered formula, against the per-group sum of 2*m*k*n."""
    g = torch.Generator().manual_seed(0)
    counts = [3, 0, 5, 8]
    offs = torch.tensor(counts).cumsum(0).to(torch.int32)
    K, N, G = 16, 8, len(counts)
    M = sum(counts)
    if case == "2d3d":
        a, b = torch.randn(M, K, generator=g), torch.randn(G, K, N, generator=g)
        want = sum(2 * c * K * N for c in counts)
        fn = lambda: torch._grouped_mm(a, b, offs=offs)  # noqa: E731
    elif case == "2d2d":  # weight gradient: K split by offs
        a, b = torch.randn(N, M, generator=g), torch.randn(M, K, generator=g)
        want = sum(2 * N * c * K for c in counts)
        fn = lambda: torch._grouped_mm(a, b, offs=offs)  # noqa: E731
    else:
        a, b = torch.randn(G, 4, K, generator=g), torch.randn(G, K, N, generator=g)
        want = 2 * G * 4 * K * N
        fn = lambda: torch._grouped_mm(a, b)  # noqa: E731
    counted, per_op = count_flops(fn)
    assert counted == want
    assert per_op == {"aten._grouped_mm": want}


def test_grouped_mm_formula_shapes():
    assert grouped_mm_flop((10, 4), (3, 4, 6)) == 2 * 10 * 4 * 6
    assert grouped_mm_flop((6, 10), (10, 4)) == 2 * 6 * 10 * 4
    assert grouped_mm_flop((3, 5, 4), (3, 4, 6)) == 2 * 3 * 5 * 4 * 6
    assert grouped_mm_flop((3, 5, 4), (4, 18)) == 2 * 5 * 4 * 18


def test_moe_flops_are_routed_not_dense():
    cfg = MoEConfig(hidden_size=64, ffn_hidden_size=128, num_experts=16, top_k=2)
    f = moe_flops(cfg, tokens=100)
    assert f["experts"] == 100 * 2 * 6 * 64 * 128  # T*k rows, not T*E
    assert f["router"] == 2 * 100 * 64 * 16
    dropped = moe_flops(cfg, tokens=100, routed=150)
    assert dropped["experts"] == 150 * 6 * 64 * 128
    gelu = moe_flops(cfg.replace(expert_type="gelu"), tokens=100)
    assert gelu["experts"] == 100 * 2 * 4 * 64 * 128


def test_active_params_and_mfu():
    w = build_workload("demo", "train", Setting(), Shape(batch=2, seq_len=16), dims=TINY)
    total, active = active_params(w.model)
    layer = moe_layers(w.model)[0]
    expert = layer.experts.w_in.numel() + layer.experts.w_out.numel()
    assert total - active == expert - expert * 2 // 4  # top-2 of 4 experts are active
    assert mfu(1e9, 1000.0, 2e9) == pytest.approx(0.5)


def test_recompute_adds_hardware_flops_only():
    w = build_workload("demo", "train", Setting(), Shape(batch=2, seq_len=16), dims=TINY)
    d = model_dims(w)
    off = step_flops(d, batch=2, q_len=16, kv_len=16, train=True)
    on = step_flops(d, batch=2, q_len=16, kv_len=16, train=True, recompute=True)
    assert on["total"] == off["total"]
    assert on["hardware_total"] > off["hardware_total"]
