import math
import random

import pytest

from moeflow.config import model_preset
from moeflow.errors import ConfigError, PlanError
from moeflow.perf import LinearCost, perf_preset
from moeflow.perf.layer import PassCost
from moeflow.plan import (
    LayerPlan,
    LayerWorkload,
    Plan,
    baselines,
    degrees_for_layer,
    fsmoe,
    fsmoe_sweep,
)
from moeflow.sim import pass_time

LAYOUT = {"fsmoe-testbed-a": (6, 8), "fsmoe-testbed-b": (8, 4)}


def test_sweep_has_1458_distinct_settings():
    ws = fsmoe_sweep(n_ep=6, n_esp=8)
    assert len(ws) == 1458 == 3**6 * 2
    assert len(set(ws)) == 1458


@pytest.mark.parametrize("cluster", sorted(LAYOUT))
def test_planner_matches_brute_force_on_a_sample(cluster):
    perf = perf_preset(cluster)
    ep, esp = LAYOUT[cluster]
    sample = random.Random(1).sample(fsmoe_sweep(n_ep=ep, n_esp=esp), 40)
    within = 0
    for w in sample:
        d = fsmoe.plan_layer(w, perf)
        pf, pb = w.pass_cost(perf), w.pass_cost(perf, True)
        tf = {r: pass_time(pf, r) for r in range(1, 17)}
        tb = {r: pass_time(pb, r, 0.0, True) for r in range(1, 17)}
        best = min(tf.values()) + min(tb.values())
        assert d.t_ms == pytest.approx(tf[d.r_fwd] + tb[d.r_bwd])
        assert d.t_ms >= best - 1e-9
        within += d.t_ms <= 1.01 * best
    assert within >= 39


def test_four_cases_are_the_published_forms():
    p = PassCost(
        alpha_a2a=0.3,
        work_a2a=4.0,
        alpha_ag=0.2,
        work_ag=3.0,
        alpha_rs=0.1,
        work_rs=2.0,
        alpha_exp=0.05,
        work_exp=10.0,
    )
    cases = {c.name: c for c in fsmoe.four_cases(p, gar_ms=1.5)}
    r = 3
    t = p.chunk(r)
    assert cases["inter"].t(r) == pytest.approx(2 * r * t.a2a + 1.5)
    assert cases["compute"].t(r) == pytest.approx(2 * t.a2a + t.ag + t.rs + r * t.exp)
    assert cases["a2a"].t(r) == pytest.approx(2 * r * t.a2a + t.ag + t.rs)
    assert cases["intra"].t(r) == pytest.approx(2 * t.a2a + r * t.ag + r * t.rs)


def test_relaxation_is_sqrt_b_over_a_when_compute_bound():
    p = PassCost(
        alpha_a2a=0.001,
        work_a2a=0.5,
        alpha_ag=0,
        work_ag=0,
        alpha_rs=0,
        work_rs=0,
        alpha_exp=0.2,
        work_exp=40.0,
    )
    r, case, feasible = fsmoe.relax(fsmoe.four_cases(p), 16)
    assert case == "compute"
    assert r == pytest.approx(math.sqrt(2 * 0.5 / 0.2))
    d = fsmoe.plan_pass(p)
    assert d.r in (2, 3)
    assert d.t_ms == min(pass_time(p, k) for k in range(1, 17))


def test_forward_and_backward_degrees_differ_somewhere():
    perf = perf_preset("fsmoe-testbed-a")
    ws = fsmoe_sweep(n_ep=6, n_esp=8)[::29]
    decisions = [fsmoe.plan_layer(w, perf) for w in ws]
    assert any(d.r_fwd != d.r_bwd for d in decisions)
    assert all(1 <= d.r_fwd <= 16 and 1 <= d.r_bwd <= 16 for d in decisions)


def test_model_evaluator_is_available_and_valid():
    perf = perf_preset("fsmoe-testbed-b")
    w = fsmoe_sweep(n_ep=8, n_esp=4)[100]
    d = fsmoe.plan_layer(w, perf, evaluator="model")
    assert d.t_ms == pytest.approx(
        pass_time(w.pass_cost(perf), d.r_fwd)
        + pass_time(w.pass_cost(perf, True), d.r_bwd, 0.0, True)
    )
    with pytest.raises(PlanError):
        fsmoe.plan_pass(w.pass_cost(perf), evaluator="nope")


def test_gradient_partition_respects_availability_and_improves_on_greedy():
    ar = LinearCost(0.5, 1e-3)
    grads = [1000.0] * 5

    def window(j, n):  # backward time with n bytes: 10 ms, gar beyond 4 ms of idle spills
        return 10.0 + max(0.0, (ar(n) if n > 0 else 0.0) - 4.0)

    part = fsmoe.partition_gradients(grads, window, [4.0] * 5, ar)
    assert part.gar_bytes[-1] == 0.0  # the last layer's window has nothing ready yet
    assert fsmoe._feasible(part.gar_bytes, grads)
    assert part.objective_ms <= part.greedy_objective_ms + 1e-9
    assert part.tail_bytes == pytest.approx(5000 - sum(part.gar_bytes))
    # greedy puts g^-1(4 ms) = 3500 bytes (capped by what is ready) in each window
    greedy = fsmoe.partition_gradients(grads, window, [4.0] * 5, ar, refine=False)
    assert greedy.gar_bytes == (1000.0, 1000.0, 1000.0, 1000.0, 0.0)


def test_whole_model_plan_beats_or_ties_baselines_and_round_trips(tmp_path):
    perf = perf_preset("fsmoe-testbed-b")
    w = LayerWorkload.from_config(model_preset("mixtral-8x7b"), tokens=2048, n_ep=8, n_esp=4)
    p = fsmoe.plan(w, perf, num_layers=4, model="mixtral-8x7b")
    for b in baselines.all_baselines(w, perf, num_layers=4):
        assert p.predicted_step_ms <= b.predicted_step_ms * 1.01, b.method
    q = Plan.from_json(p.to_json())
    assert q.to_dict() == p.to_dict()
    assert all(isinstance(r, int) for lp in q.layers for r in (lp.r_fwd, lp.r_bwd))
    assert degrees_for_layer(q, 2) == (q.layers[2].r_fwd, q.layers[2].r_bwd)
    with pytest.raises(ConfigError):
        degrees_for_layer(q, 99)
    p.save(tmp_path / "p.json")
    assert Plan.load(tmp_path / "p.json").predicted_step_ms == p.predicted_step_ms


def test_single_layer_plan_applies_to_every_layer():
    perf = perf_preset("fsmoe-testbed-a")
    p = fsmoe.plan(fsmoe_sweep(n_ep=6, n_esp=8)[0], perf, include_attention=False)
    assert degrees_for_layer(p, 17) == degrees_for_layer(p, 0)


def test_workload_from_config_and_sizes():
    mp = model_preset("mixtral-8x7b")
    w = LayerWorkload.from_config(mp, tokens=8192, n_ep=6, n_esp=8)
    assert (w.B, w.L, w.M, w.H, w.E, w.k, w.ffn, w.heads) == (
        2,
        4096,
        4096,
        14336,
        8,
        2,
        "mixtral",
        32,
    )
    assert w.f is None and w.load_factor == 1.0
    assert w.a2a_bytes == 2 * 8192 * 4096 * 2 / 8
    assert w.expert_flops == 2 * 2 * 8192 * 4096 * 14336 / 8 * 3
    bwd, fwd = (
        w.pass_cost(perf_preset("fsmoe-testbed-a"), True),
        w.pass_cost(perf_preset("fsmoe-testbed-a")),
    )
    assert bwd.work_exp == pytest.approx(2 * fwd.work_exp)
    assert LayerWorkload.from_dict(w.to_dict()) == w
    with pytest.raises(ConfigError):
        LayerWorkload(B=1, L=1, M=1, H=1, E=2, k=3)
    with pytest.raises(ConfigError):
        LayerWorkload(B=1, L=1, M=1, H=1, E=2, ffn="moe")


def test_runtime_reads_the_plans_degrees():
    runtime = pytest.importorskip("moeflow.parallel")
    perf = perf_preset("fsmoe-testbed-b")
    w = LayerWorkload.from_config(model_preset("mixtral-8x7b"), tokens=2048, n_ep=8, n_esp=4)
    p = Plan.from_json(fsmoe.plan(w, perf, num_layers=3).to_json())
    for i in range(3):
        assert runtime.resolve_degrees(p, i, 1, 1) == degrees_for_layer(p, i)


@pytest.mark.parametrize(
    "make,field",
    [
        (lambda: LayerPlan(index=0, r_fwd=0, r_bwd=1), "LayerPlan.r_fwd"),
        (lambda: LayerPlan(index=0, r_fwd=1, r_bwd=2.0), "LayerPlan.r_bwd"),
        (lambda: LayerWorkload(B=1, L=8, M=8, H=8, E=4, n_ep=0), "LayerWorkload.n_ep"),
        (
            lambda: LayerWorkload.from_config(model_preset("mixtral-8x7b"), tokens=0),
            "LayerWorkload.tokens",
        ),
    ],
)
def test_positive_int_fields_name_themselves(make, field):
    with pytest.raises(ConfigError, match="a positive int") as info:
        make()
    assert info.value.field == field


def test_pass_cost_prices_experts_by_the_profiled_kernel_of_its_dtype():
    from moeflow.errors import ConfigError
    from moeflow.perf import LinearCost, PerfModel
    from moeflow.plan.workload import LayerWorkload

    w = LayerWorkload(B=1, L=512, M=64, H=128, E=4, n_ep=2, bytes_per_element=4)
    base = {"gemm": LinearCost(0.0, 1e-9), "a2a": LinearCost(0.1, 1e-6)}
    fwd, bwd = LinearCost(0.2, 3e-9), LinearCost(0.5, 7e-9)
    perf = PerfModel("p", {**base, "expert_fwd@float32": fwd, "expert_bwd@float32": bwd})
    pf, pb = w.pass_cost(perf), w.pass_cost(perf, True)
    assert (pf.alpha_exp, pf.work_exp) == (0.2, pytest.approx(3e-9 * w.expert_flops))
    assert (pb.alpha_exp, pb.work_exp) == (0.5, pytest.approx(7e-9 * w.expert_flops))
    # bf16 has no expert cost in this model: the square-GEMM fit, doubled for backward
    pb16 = w.replace(bytes_per_element=2).pass_cost(perf, True)
    assert pb16.work_exp == pytest.approx(2e-9 * w.expert_flops)
    with pytest.raises(ConfigError, match="'a2a'"):
        w.pass_cost(PerfModel("g", {"gemm": LinearCost(0.0, 1e-9)}))


def test_planner_keeps_one_chunk_when_the_profile_measured_no_overlap():
    from dataclasses import replace

    from moeflow.perf import LinearCost, PerfModel
    from moeflow.plan import fsmoe
    from moeflow.plan.workload import LayerWorkload

    # a2a and experts of equal size: on separate resources chunks hide one behind the other
    w = LayerWorkload(B=1, L=4096, M=1024, H=4096, E=8, n_ep=8)
    a2a_beta = 1.0 / w.a2a_bytes
    gemm_beta = 1.0 / w.expert_flops
    costs = {
        "gemm": LinearCost(0.01, gemm_beta),
        "a2a": LinearCost(0.01, a2a_beta),
        "ar": LinearCost(0.01, 1e-9),
    }
    separate = PerfModel("sep", costs, meta={"overlap": 0.9})
    shared = replace(separate, name="shared", meta={"overlap": 0.1})
    assert fsmoe.shared_resources(separate) == ()
    assert fsmoe.shared_resources(PerfModel("preset", costs)) == ()
    d_sep, d_shared = fsmoe.plan_layer(w, separate), fsmoe.plan_layer(w, shared)
    assert d_sep.r_fwd > 1 and d_sep.r_bwd > 1
    # one resource: every chunk only adds start-ups, so one chunk is best
    assert (d_shared.r_fwd, d_shared.r_bwd) == (1, 1)
    assert d_shared.t_ms > d_sep.t_ms
