"""Geo pipeline and data-parallel steps on the event engine, against the closed forms of
:mod:`moeflow.plan.geo`: a hand-computed timeline, the exact two-flow-line formula, the
closed form's bounds on symmetric links, and the data-parallel ring."""

import random

import pytest

from moeflow.errors import PlanError
from moeflow.plan import geo
from moeflow.plan import geo_sim as sg
from moeflow.plan.geo import Device, DeviceGraph, OpGraph, OpNode
from moeflow.sim import simulate


def chain(flops, out=1.0, params=1.0):
    return OpGraph(
        tuple(OpNode(f"n{k}", f, out, params, (k - 1,) if k else ()) for k, f in enumerate(flops))
    )


def devices(flops, bw=1.0, lat=0.0):
    n = len(flops)
    return DeviceGraph(
        tuple(Device(f"d{i}", f, 1e12) for i, f in enumerate(flops)),
        tuple(tuple(0.0 if i == j else bw for j in range(n)) for i in range(n)),
        tuple(tuple(0.0 if i == j else lat for j in range(n)) for i in range(n)),
    )


def random_case(rng, symmetric=True):
    n, d = rng.randint(2, 8), rng.randint(2, 5)
    nodes = []
    for k in range(n):
        ins = tuple(sorted(rng.sample(range(k), rng.randint(1, min(k, 2))))) if k else ()
        nodes.append(OpNode(f"n{k}", rng.uniform(1, 10), rng.uniform(0.1, 20), 1.0, ins))
    bw = [[0.0] * d for _ in range(d)]
    lat = [[0.0] * d for _ in range(d)]
    for i in range(d):
        for j in range(d):
            if i < j:
                bw[i][j] = bw[j][i] = rng.choice([0.5, 2.0, 10.0, 50.0])
            if i != j and (i < j or not symmetric):
                lat[i][j] = rng.uniform(0, 0.5)
                if symmetric:
                    lat[j][i] = lat[i][j]
    g = DeviceGraph(
        tuple(Device(f"d{i}", rng.uniform(1, 5), 1e9) for i in range(d)),
        tuple(map(tuple, bw)),
        tuple(map(tuple, lat)),
    )
    return OpGraph(tuple(nodes)), g, rng.randint(1, 8)


def two_flow_lines(ops, graph, plan):
    """Forward and backward flow lines (module docstring of moeflow.plan.geo_sim), in seconds."""
    c = geo.stage_costs(ops, graph, plan)
    a = [f + x for f, x, _ in c]
    b = [2 * f + y for f, _, y in c]
    return sum(a) + sum(b) + (plan.microbatches - 1) * (max(a) + max(b))


def test_hand_timeline_without_links():
    # two stages, forward 1 s and 2 s per micro-batch (backward 2 s and 4 s), free links: the
    # forward flow line ends at 1 + 3 * 2 = 7 s, the backward one at 7 + 4 + 2 * 4 + 2 = 21 s
    ops = chain([1.0, 2.0], out=0.0)
    g = devices([1.0, 1.0], bw=1.0)
    p = geo.evaluate(ops, g, bounds=(0, 1, 2), devices=(0, 1), microbatches=3)
    tl = sg.simulate_gpipe(ops, g, p)
    assert tl.task("F1.m2") == (5000.0, 7000.0)  # ms
    assert tl.task("B1.m0") == (7000.0, 11000.0)
    assert tl.task("B0.m2") == (19000.0, 21000.0)
    assert tl.makespan == pytest.approx(1e3 * p.step_time_s) == 21000.0
    assert p.step_time_s == 3 * 3 + 2 * 6


def test_links_are_paid_by_the_stage_that_owns_them():
    # one cut of 2 bytes over 1 B/s with 0.5 s latency: 2.5 s each way
    ops = chain([1.0, 1.0], out=2.0)
    g = devices([1.0, 1.0], bw=1.0, lat=0.5)
    p = geo.evaluate(ops, g, bounds=(0, 1, 2), devices=(0, 1), microbatches=2)
    assert p.stage_times == (3.0 + 5.0, 3.0)
    tl = sg.simulate_gpipe(ops, g, p)
    assert tl.task("X0.m0") == (1000.0, 3500.0)
    assert tl.task("F0.m1") == (3500.0, 4500.0)  # the sender waited for its send
    # B1.m0 runs [8, 10] after F1.m1; d0 is free from 7 s, so the gradients go at once
    assert tl.task("Y0.m0") == pytest.approx((10000.0, 12500.0))
    assert tl.task("Y0.m1") == pytest.approx((14500.0, 17000.0))  # d0 ran B0.m0 until 14.5
    assert tl.makespan == pytest.approx(1e3 * p.step_time_s)
    free = sg.simulate_gpipe(ops, g, p, blocking=False)
    assert free.task("F0.m1") == (1000.0, 2000.0)
    assert free.makespan < tl.makespan


def test_the_simulator_follows_two_flow_lines():
    rng = random.Random(0)
    for _ in range(60):
        ops, g, m = random_case(rng, symmetric=rng.random() < 0.5)
        p = geo.partition(ops, g, microbatches=m, adatopk=rng.random() < 0.5)
        assert sg.gpipe_step_s(ops, g, p) == pytest.approx(two_flow_lines(ops, g, p), rel=1e-9)


def test_sparse_link_sends_values_and_positions_forward_values_only_backward():
    # a cut of 100 bytes at density 0.1 over 10 B/s with 0.5 s latency: 20 bytes forward
    # (fp32 values and int32 positions), 10 bytes backward (the values at those positions)
    ops = chain([1.0, 1.0], out=100.0)
    g = devices([1.0, 1.0], bw=10.0, lat=0.5)
    p = geo.evaluate(ops, g, bounds=(0, 1, 2), devices=(0, 1), microbatches=2, densities=(0.1,))
    assert p.stage_times == pytest.approx((3.0 + 2.5 + 1.5, 3.0))
    tl = sg.simulate_gpipe(ops, g, p)
    x0, y0 = tl.task("X0.m0"), tl.task("Y0.m0")
    assert x0[1] - x0[0] == pytest.approx(2500.0) and y0[1] - y0[0] == pytest.approx(1500.0)
    assert tl.makespan == pytest.approx(1e3 * two_flow_lines(ops, g, p))


def test_closed_form_bounds_the_simulated_step_on_symmetric_links():
    """``closed <= simulated <= 7/6 closed`` on exact links: each of ``max (f + x)`` and
    ``max (2 f + y)`` is at most 1/2 and 2/3 of ``max (3 f + x + y)`` when ``x = y``; a
    sparsified link has ``y <= x <= 2 y``, where each is at most 2/3 (``<= 4/3 closed``)."""
    rng = random.Random(1)
    ratios = []
    for _ in range(80):
        ops, g, m = random_case(rng)
        p = geo.partition(ops, g, microbatches=m, adatopk=rng.random() < 0.5)
        r = sg.gpipe_step_s(ops, g, p) / p.step_time_s
        assert r <= (7 / 6 if set(p.densities) <= {1.0} else 4 / 3) + 1e-12
        ratios.append(r)
        assert sg.gpipe_step_s(ops, g, p, blocking=False) <= sg.gpipe_step_s(ops, g, p) + 1e-12
    assert min(ratios) >= 1 - 1e-12
    assert sorted(ratios)[len(ratios) // 2] == pytest.approx(1.0, abs=1e-9)  # median: exact


def test_uniform_pipeline_is_exact():
    ops = chain([2.0] * 8, out=3.0)
    g = devices([1.0] * 4, bw=2.0, lat=0.25)
    p = geo.partition(ops, g, microbatches=6)
    assert p.num_stages == 4
    assert sg.gpipe_step_s(ops, g, p) == pytest.approx(p.step_time_s, rel=1e-12)


def test_data_parallel_ring_by_hand():
    # equal compute: the ring's slow hops are busy from the end of compute to the end
    ops = chain([2.0, 2.0], params=15.0)
    g = DeviceGraph.from_dict(
        {
            "devices": [{"name": f"x{i}", "flops": 2.0, "memory_bytes": 1e6} for i in range(3)],
            "bandwidth_mbps": [[0, 8e-5, 8e-6], [8e-5, 0, 8e-6], [8e-6, 8e-6, 0]],
        }
    )
    closed = geo.data_parallel_step_s(ops, g, microbatches=3)
    # compute 3 * 4 / 2 = 6 s; 10-byte chunks at 10 B/s (x0-x1) and 1 B/s (to x2); 4 steps
    assert sorted(geo.data_parallel_costs(ops, g, microbatches=3).hop_s) == [1.0, 10.0, 10.0]
    assert closed == pytest.approx(6 + 4 * 10)
    assert sg.data_parallel_sim_s(ops, g, microbatches=3) == pytest.approx(closed)
    tl = simulate(sg.data_parallel_graph(ops, g, microbatches=3))
    assert len([t for t in tl.graph.tasks if t.kind == "allreduce"]) == 3 * 4
    # x0 and x1 alone: compute 3 * 4 * 1.5 / 2 = 9 s, two steps of 15 bytes at 10 B/s
    assert sg.data_parallel_sim_s(ops, g, microbatches=3, devices=[0, 1]) == pytest.approx(12.0)


def test_data_parallel_simulation_is_bounded_by_the_closed_form():
    rng = random.Random(2)
    n = 0
    for _ in range(40):
        ops, g, m = random_case(rng)
        try:
            dp = geo.data_parallel_costs(ops, g, microbatches=m)
        except PlanError:
            continue
        n += 1
        sim = sg.data_parallel_sim_s(ops, g, microbatches=m)
        low = min(dp.compute_s) + dp.steps * max(dp.hop_s)
        assert low - 1e-9 <= sim <= dp.step_time_s + 1e-9
    assert n >= 20


def test_single_device_data_parallel_has_no_ring():
    ops = chain([3.0])
    g = devices([3.0])
    assert sg.data_parallel_sim_s(ops, g, microbatches=2) == pytest.approx(6.0)
    assert geo.data_parallel_step_s(ops, g, microbatches=2) == pytest.approx(6.0)
