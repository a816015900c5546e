"""The breakdown: rows partition the measured step; forward and backward land in the right
rows; recomputation moves forward work into backward; every model source works."""

import pytest
import torch

from moeflow.apps.bench import Setting, Shape, build_workload, dissect
from moeflow.apps.bench.dissect import attribute
from moeflow.apps.bench.workloads import timed_modules

TINY = {
    "dim": 32,
    "num_layers": 1,
    "num_heads": 4,
    "num_experts": 4,
    "top_k": 2,
    "ffn_hidden_size": 64,
}


def test_breakdown_sums_to_the_measured_step(demo_train):
    """The rows add up to the step timed with perf_counter (same profiled steps) within 5%,
    and to the profiler's interval of the step scope (start to end, not the self times the
    rows are made of) within 1%: no event is dropped or charged twice."""
    _, d = demo_train
    assert d.steps == 3 and len(d.step_ms_each) == 3
    assert d.total() == pytest.approx(d.step_ms, rel=0.01)
    assert abs(d.total() - d.wall_ms) <= 0.05 * d.wall_ms
    assert d.unprofiled_ms > 0


def test_rows_and_phases_of_a_training_step(demo_train):
    _, d = demo_train
    for row in ("attention", "norm", "moe_router", "moe_experts", "lm_head", "embedding"):
        assert d.rows.get(("forward", row), 0) > 0, row
    for row in ("attention", "moe_experts", "lm_head"):
        assert d.rows.get(("backward", row), 0) > 0, row  # joined by sequence number
    assert d.rows.get(("optimizer", "other"), 0) > 0
    # the expert GEMMs are charged to the experts, forward and backward
    gemm_rows = {r for (p, r, op) in d.ops if op in ("aten::mm", "aten::_grouped_mm")}
    assert "moe_experts" in gemm_rows
    # the operators cover the step scope's interval too, each event once
    assert sum(ms for (p, r, o), (ms, _) in d.ops.items()) == pytest.approx(d.step_ms, rel=0.01)


def test_inventory_records_shapes_and_gemms(demo_train):
    _, d = demo_train
    gemms = [g for rec in d.inventory for g in rec.gemms]
    assert gemms and all(shapes for _, shapes in gemms)
    assert {rec.phase for rec in d.inventory} == {"forward", "backward", "optimizer"}


def test_recompute_runs_forward_work_in_backward():
    """With recomputation the blocks' forward operators run again inside backward: the
    backward rows gain the forward's GEMM calls."""

    def bwd_mm_calls(recompute):
        w = build_workload(
            "demo", "train", Setting(recompute=recompute), Shape(batch=2, seq_len=16), dims=TINY
        )
        d = dissect(w, warmup=1, steps=1, unprofiled=1)
        return sum(
            c
            for (p, r, o), (_, c) in d.ops.items()
            if p == "backward" and r == "attention" and o == "aten::mm"
        )

    assert bwd_mm_calls(True) > bwd_mm_calls(False)


def test_timed_modules_of_the_demo_model():
    w = build_workload("demo", "train", Setting(), Shape(batch=2, seq_len=16), dims=TINY)
    rows = {name: row for name, _, row in timed_modules(w.model)}
    assert rows["embed"] == "embedding" and rows["head"] == "lm_head"
    assert rows["blocks.0.moe"] == "moe_other"
    assert rows["blocks.0.moe.router"] == "moe_router"
    assert rows["blocks.0.moe.experts"] == "moe_experts"
    assert rows["blocks.0.norm1"] == "norm" and rows["blocks.0.qkv"] == "attention"


def test_decode_step_is_forward_only():
    w = build_workload("demo", "decode", Setting(), Shape(batch=2, seq_len=16), dims=TINY)
    d = dissect(w, warmup=1, steps=2, unprofiled=1)
    assert {p for p, _ in d.rows} == {"forward"}
    assert d.rows[("forward", "moe_experts")] > 0


def test_serving_model_decode_uses_its_kv_cache():
    w = build_workload("decoder", "decode", Setting(), Shape(batch=2, seq_len=16), dims=TINY)
    assert w.tokens == 2
    d = dissect(w, warmup=1, steps=2, unprofiled=1)
    assert d.rows[("forward", "attention")] > 0 and d.rows[("forward", "moe_experts")] > 0


def test_patched_transformers_model(tmp_path):
    """A tiny Qwen3-MoE saved with save_pretrained, loaded and patched: its MoE blocks are
    moeflow layers and show up as MoE rows, its attention and norms as theirs."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path)
    for mode in ("train", "decode"):
        w = build_workload("hf", mode, Setting(), Shape(batch=2, seq_len=8), path=str(tmp_path))
        d = dissect(w, warmup=1, steps=1, unprofiled=1)
        for row in ("attention", "norm", "moe_router", "moe_experts", "embedding", "lm_head"):
            assert d.rows.get(("forward", row), 0) > 0, (mode, row)
        if mode == "train":
            assert d.rows.get(("backward", "moe_experts"), 0) > 0


def test_attribute_ignores_events_outside_steps():
    assert attribute([]) == ([], [], [])
