"""The simulator's prediction: work from the inventory, costs from a PerfModel."""

import pytest

from moeflow.apps.bench import count_flops
from moeflow.apps.bench.dissect import AUTOGRAD_NODE, MODULE_CALL, run_step
from moeflow.apps.bench.predict import (
    OP_CLASSES,
    compare,
    ep_step_graph,
    gemm_flops,
    op_class,
    predict_rows,
    profile_op_class,
    step_graph,
)
from moeflow.perf.cost import LinearCost, PerfModel
from moeflow.sim import simulate


def _perf(gemm_beta=1e-9, op_alpha=1e-3):
    costs = {
        f"{c}@float32": LinearCost(op_alpha, 0.0, source="assumed").to_dict()
        for c in ("elementwise", *OP_CLASSES)
    }
    costs["gemm@float32"] = LinearCost(0.0, gemm_beta, source="assumed").to_dict()
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
    assert op_class("aten::softmax") == "reduce"
    assert op_class("aten::index_add_") == "index"
    assert op_class("aten::copy_") == "copy"
    assert op_class("aten::silu") == "elementwise"


def test_op_class_fit_is_positive():
    c = profile_op_class("elementwise", "float32", reps=2, trials=1)
    assert c.alpha > 0 and c.beta > 0 and c.source == "measured"


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
