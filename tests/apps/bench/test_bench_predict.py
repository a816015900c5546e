"""The simulator's prediction: work from the inventory, costs from a PerfModel."""

import pytest

from moeflow.apps.bench import count_flops
from moeflow.apps.bench.dissect import AUTOGRAD_NODE, MODULE_CALL, run_step
from moeflow.apps.bench.predict import (
    OP_CLASSES,
    compare,
    ep_step_graph,
    gemm_flops,
    is_wgrad,
    op_bytes_and_dtype,
    op_class,
    predict_rows,
    profile_op_class,
    step_graph,
)
from moeflow.perf.cost import LinearCost, PerfModel
from moeflow.sim import simulate

GEMM_FITS = ("gemm", "grouped_gemm_wgrad", "attention_bwd")


def _perf(gemm_beta=1e-9, op_alpha=1e-3, **betas):
    """Every operator class at ``op_alpha`` ms; the GEMM fits at ``gemm_beta`` ms/FLOP
    unless ``betas`` names one (``attention_bwd=...``)."""
    costs = {
        f"{c}@float32": LinearCost(op_alpha, 0.0, source="assumed").to_dict()
        for c in ("elementwise", *OP_CLASSES)
    }
    for k in GEMM_FITS:
        costs[f"{k}@float32"] = LinearCost(0.0, betas.get(k, gemm_beta), source="assumed").to_dict()
    return PerfModel(
        name="synthetic", costs={"gemm": LinearCost(0.0, gemm_beta)}, meta={"bench_costs": costs}
    )


def test_inventory_gemm_flops_equal_the_flop_counter(demo_train):
    """The GEMMs the prediction prices carry exactly the FLOPs FlopCounterMode counts for a
    step of the same shapes (each GEMM once, nested GEMMs not again)."""
    w, d = demo_train
    priced = sum(gemm_flops(n, s) for rec in d.inventory for n, s in rec.gemms)
    w.before_step()
    counted, _ = count_flops(lambda: run_step(w))
    assert priced == counted


def test_prediction_is_cost_times_work(demo_train):
    _, d = demo_train
    n_gemm_free = sum(
        1 for rec in d.inventory if not rec.gemms and rec.name not in (MODULE_CALL, AUTOGRAD_NODE)
    )
    flops = sum(gemm_flops(n, s) for rec in d.inventory for n, s in rec.gemms)
    rows = predict_rows(d, _perf(), "float32")
    assert sum(rows.values()) == pytest.approx(flops * 1e-9 + n_gemm_free * 1e-3)
    # twice the GEMM cost: the GEMM-heavy expert rows grow, the norms do not
    rows2 = predict_rows(d, _perf(gemm_beta=2e-9), "float32")
    assert rows2[("forward", "moe_experts")] > rows[("forward", "moe_experts")]
    assert rows2[("forward", "norm")] == pytest.approx(rows[("forward", "norm")])


def test_fixed_costs_per_module_call_node_and_python_op(demo_train):
    """Module calls and backward nodes are counted in the inventory and priced by their
    own fixed costs; forward and optimizer operators pay their Python overhead."""
    _, d = demo_train
    calls = sum(1 for rec in d.inventory if rec.name == MODULE_CALL)
    nodes = sum(1 for rec in d.inventory if rec.name == AUTOGRAD_NODE)
    assert calls > 0 and nodes > 0
    assert all(rec.phase == "backward" for rec in d.inventory if rec.name == AUTOGRAD_NODE)
    base = _perf(op_alpha=0.0)
    with_fixed = _perf(op_alpha=0.0)
    table = dict(with_fixed.meta["bench_costs"])
    table["module_call"] = LinearCost(0.01, 0.0).to_dict()
    table["autograd_node"] = LinearCost(0.1, 0.0).to_dict()
    with_fixed = PerfModel(name="fixed", costs=with_fixed.costs, meta={"bench_costs": table})
    extra = sum(predict_rows(d, with_fixed, "float32").values()) - sum(
        predict_rows(d, base, "float32").values()
    )
    assert extra == pytest.approx(0.01 * calls + 0.1 * nodes)


def test_compare_reports_rows_and_total(demo_train):
    _, d = demo_train
    c = compare(d, _perf(), "float32")
    assert c["measured_ms"] == d.unprofiled_ms
    assert c["predicted_ms"] == pytest.approx(sum(predict_rows(d, _perf(), "float32").values()))
    assert c["ratio"] == pytest.approx(c["predicted_ms"] / c["measured_ms"])
    assert sum(r["measured_ms"] for r in c["rows"]) == pytest.approx(d.unprofiled_ms)


def test_missing_costs_are_a_config_error(demo_train):
    from moeflow.errors import ConfigError

    _, d = demo_train
    bare = PerfModel(name="bare", costs={"gemm": LinearCost(0.0, 1e-9)})
    with pytest.raises(ConfigError, match="bench_costs"):
        predict_rows(d, bare, "float32")


def test_ep_graph_overlaps_link_and_compute():
    rows = {("forward", "attention"): 1.0, ("forward", "moe_experts"): 4.0}
    comm = {"forward": (2.0, 2.0)}
    serial = simulate(step_graph({**rows, ("forward", "a2a"): 4.0})).makespan
    one = simulate(ep_step_graph(rows, comm, 1)).makespan
    four = simulate(ep_step_graph(rows, comm, 4)).makespan
    assert one == pytest.approx(serial)  # r = 1: nothing overlaps
    assert four == pytest.approx(1.0 + 0.5 + 4.0 + 0.5)  # chunked: link hides under compute


def test_op_classes():
    assert op_class("aten::softmax") == "softmax"
    assert op_class("aten::index_add_") == "index"
    assert op_class("aten::copy_") == "copy"
    assert op_class("aten::transpose") == "view" and op_class("aten::empty") == "view"
    assert op_class("aten::sum") == "reduce" and op_class("aten::_softmax") == "softmax"
    # a cast or reshape copies only when it calls a copying operator
    assert op_class("aten::to", ["aten::_to_copy"]) == "copy"
    assert op_class("aten::to", []) == "view"
    assert op_class("aten::reshape", ["aten::clone", "aten::_unsafe_view"]) == "copy"
    assert op_class("aten::reshape", ["aten::view"]) == "view"


def test_inventory_records_the_operators_each_op_calls(demo_train):
    _, d = demo_train
    casts = [rec for rec in d.inventory if rec.name == "aten::to"]
    assert casts and all(isinstance(rec.calls, list) for rec in casts)
    grouped = [rec for rec in d.inventory if rec.name == "aten::_grouped_mm"]
    assert grouped and all("aten::mm" in rec.calls for rec in grouped)  # CPU: mm per group
    assert op_class("aten::add") == "elementwise"
    assert op_class("aten::silu") == "transcendental"
    assert op_class("aten::silu_backward") == "transcendental"


def test_op_class_fit_is_positive():
    c = profile_op_class("elementwise", "float32", reps=2, trials=1)
    assert c.alpha > 0 and c.beta > 0 and c.source == "measured"
    assert c.r2 is not None and c.max_rel_err is not None and len(c.points) >= 2


def test_a_view_costs_no_bytes():
    """A view's time does not grow with its tensor: over the sweep (4 KiB .. 16 MiB) its
    largest time stays within a few times its smallest, where a copy grows ~4000-fold."""
    c = profile_op_class("view", "float32", reps=5, trials=3)
    ts = [t for _, t in c.points]
    assert max(ts) < 20 * min(ts)
    copy = profile_op_class("copy", "float32", reps=2, trials=3)
    cts = [t for _, t in copy.points]
    assert max(cts) > 50 * min(cts)


def test_costs_fitted_by_moeflow_profile_are_read_from_the_model(demo_train):
    from dataclasses import replace

    from moeflow.errors import ConfigError

    _, d = demo_train
    perf = _perf()
    table = dict(perf.meta["bench_costs"])
    elementwise = LinearCost.from_dict(table.pop("elementwise@float32"))
    without = replace(perf, meta={"bench_costs": table})
    with pytest.raises(ConfigError, match="elementwise@float32"):
        predict_rows(d, without, "float32")
    profiled = replace(without, costs={**perf.costs, "elementwise@float32": elementwise})
    assert predict_rows(d, profiled, "float32") == predict_rows(d, perf, "float32")


@pytest.mark.parametrize(
    ("fit", "op", "phase", "row"),
    [
        ("grouped_gemm_wgrad", "aten::_grouped_mm", "backward", "moe_experts"),
        (
            "attention_bwd",
            "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
            "backward",
            "attention",
        ),
    ],
)
def test_backward_gemm_fits_price_their_operators(demo_train, fit, op, phase, row):
    """The expert weight gradient (2-D x 2-D grouped_mm) and the flash-attention backward
    have fits of their own: changing one moves exactly its operators' FLOPs, in its row."""
    _, d = demo_train
    flops = sum(
        gemm_flops(n, s)
        for rec in d.inventory
        for n, s in rec.gemms
        if n == op and (fit != "grouped_gemm_wgrad" or is_wgrad(n, s))
    )
    assert flops > 0
    base = predict_rows(d, _perf(), "float32")
    more = predict_rows(d, _perf(**{fit: 3e-9}), "float32")
    assert more[(phase, row)] - base[(phase, row)] == pytest.approx(flops * 2e-9)
    assert sum(more.values()) - sum(base.values()) == pytest.approx(flops * 2e-9)
    # the forward grouped GEMMs (2-D x 3-D) stay on the forward fit
    assert more[("forward", "moe_experts")] == pytest.approx(base[("forward", "moe_experts")])


@pytest.mark.parametrize("missing", ["grouped_gemm_wgrad", "attention_bwd", "transcendental"])
def test_a_model_without_a_new_cost_is_refused_by_name(demo_train, missing):
    from dataclasses import replace

    from moeflow.errors import ConfigError

    _, d = demo_train
    perf = _perf()
    table = dict(perf.meta["bench_costs"])
    del table[f"{missing}@float32"]
    with pytest.raises(ConfigError, match=f"{missing}@float32"):
        predict_rows(d, replace(perf, meta={"bench_costs": table}), "float32")


def test_transcendental_ops_use_their_own_fit(demo_train):
    _, d = demo_train
    n = sum(1 for rec in d.inventory if not rec.gemms and op_class(rec.name) == "transcendental")
    assert n > 0  # SwiGLU's silu and its backward
    perf = _perf(op_alpha=0.0)
    table = dict(perf.meta["bench_costs"])
    table["transcendental@float32"] = LinearCost(0.5, 0.0).to_dict()
    from dataclasses import replace

    more = predict_rows(d, replace(perf, meta={"bench_costs": table}), "float32")
    assert sum(more.values()) - sum(predict_rows(d, perf, "float32").values()) == pytest.approx(
        0.5 * n
    )


def test_each_operator_is_priced_at_its_own_dtype():
    """A float32 operator in a bf16 step is priced with the float32 fit at 4 bytes per
    element; integer inputs count their own element size."""
    from moeflow.apps.bench.dissect import OpRecord

    stat = OpRecord("forward", "norm", "aten::mean", 0.0, [[8, 16]], dtypes=["float"])
    assert op_bytes_and_dtype(stat, "bfloat16") == (2 * 8 * 16 * 4, "float32")
    mixed = OpRecord(
        "forward",
        "moe_other",
        "aten::index_add",
        0.0,
        [[4, 16], [], [8]],
        dtypes=["c10::BFloat16", "Scalar", "long int"],
    )
    assert op_bytes_and_dtype(mixed, "bfloat16") == (64 * 2 + 8 * 8 + 64 * 2, "bfloat16")
    # an inventory without dtypes (an older report) falls back to the step's dtype
    bare = OpRecord("forward", "norm", "aten::mean", 0.0, [[8, 16]])
    assert op_bytes_and_dtype(bare, "bfloat16") == (2 * 8 * 16 * 2, "bfloat16")


@pytest.mark.parametrize("fn", ["attention_bwd", "grouped_gemm_wgrad"])
def test_backward_fits_carry_their_fit_quality(fn):
    import moeflow.apps.bench.predict as predict

    c = getattr(predict, f"profile_{fn}")("float32", reps=1, trials=1)
    assert c.beta > 0 and c.source == "measured"
    assert c.r2 is not None and c.max_rel_err is not None and len(c.points) >= 12
    assert LinearCost.from_dict(c.to_dict()) == c


def _synthetic_step(inventory):
    from moeflow.apps.bench.dissect import StepDissection

    return StepDissection(
        step_ms=1.0,
        wall_ms=1.0,
        unprofiled_ms=1.0,
        rows={},
        ops={},
        steps=1,
        step_ms_each=[1.0],
        inventory=inventory,
    )


def test_compiled_graph_calls_are_priced_by_their_own_cost():
    """Each inductor graph call of a compiled step costs ``compiled_call`` forward and
    ``compiled_call_bwd`` backward; a model without them is refused by name."""
    from dataclasses import replace

    from moeflow.apps.bench.dissect import COMPILED_CALL, OpRecord
    from moeflow.errors import ConfigError

    d = _synthetic_step(
        [
            OpRecord("forward", "norm", COMPILED_CALL, 0.0, []),
            OpRecord("forward", "norm", COMPILED_CALL, 0.0, []),
            OpRecord("backward", "norm", COMPILED_CALL, 0.0, []),
        ]
    )
    perf = _perf()
    with pytest.raises(ConfigError, match="compiled_call"):
        predict_rows(d, perf, "float32")
    table = {
        **perf.meta["bench_costs"],
        "compiled_call": LinearCost(0.25, 0.0).to_dict(),
        "compiled_call_bwd": LinearCost(0.5, 0.0).to_dict(),
    }
    rows = predict_rows(d, replace(perf, meta={"bench_costs": table}), "float32")
    assert rows == {("forward", "norm"): pytest.approx(0.5), ("backward", "norm"): 0.5}


def test_compiled_call_cost_is_measured():
    from moeflow.apps.bench.predict import profile_compiled_call

    fwd, bwd = profile_compiled_call(reps=20, trials=3)
    assert fwd.alpha > 0 and bwd.alpha > 0
    assert fwd.source == bwd.source == "measured"


@pytest.mark.slow
def test_compiled_step_inventory_lists_its_graph_calls():
    """Under torch.compile the inventory holds the inductor graph calls (their fused
    kernels are no aten operators) and the extern GEMMs, so the step is predicted."""
    from moeflow.apps.bench import Setting, Shape, build_workload, dissect
    from moeflow.apps.bench.dissect import COMPILED_CALL
    from tests.apps.bench.conftest import TINY

    w = build_workload(
        "demo", "train", Setting(compile=True), Shape(batch=4, seq_len=32), dims=TINY
    )
    d = dissect(w, warmup=2, steps=1, unprofiled=1)
    calls = [rec for rec in d.inventory if rec.name == COMPILED_CALL]
    assert {rec.phase for rec in calls} == {"forward", "backward"}
    assert any(rec.gemms for rec in d.inventory)


def test_terms_partition_the_prediction(demo_train):
    """The per-term comparison splits the same prediction by cost term: its predicted
    times sum to the rows', and every phase's measured terms sum to its profiled time."""
    from moeflow.apps.bench.predict import compare_terms

    _, d = demo_train
    perf = _perf()
    terms = compare_terms(d, perf, "float32")
    rows = predict_rows(d, perf, "float32")
    assert sum(t["predicted_ms"] for t in terms) == pytest.approx(sum(rows.values()))
    names = {t["term"] for t in terms}
    assert {"grouped_gemm", "grouped_gemm_wgrad", "attention_bwd", "host"} <= names
    assert "elementwise@float32" in names
    for phase in ("forward", "backward", "optimizer"):
        measured = sum(t["measured_ms"] for t in terms if t["phase"] == phase)
        assert measured >= d.phase_total(phase) * (1 - 1e-9)
