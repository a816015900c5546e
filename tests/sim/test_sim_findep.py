"""FinDEP task graphs: hand-computed timelines, both orders, and agreement with the closed
forms of :mod:`moeflow.plan.findep`."""

import random

import pytest

from moeflow.errors import ConfigError
from moeflow.plan import findep as fd
from moeflow.sim import simulate
from moeflow.sim.findep import findep_graph, schedule_graph, sim_time


def test_single_micro_batch_single_chunk_is_serial():
    # attn 2 -> a2e 1 -> exp 3 -> e2a 1 per layer; shared 1 overlaps with the routed path
    tl = simulate(findep_graph(2.0, 1.0, 3.0, 1.0, 1, 1, "ASAS", 2))
    assert tl.task("L0.m0.e2a0") == (6.0, 7.0)
    assert tl.task("L1.m0.attn") == (7.0, 9.0)
    assert tl.makespan == 14.0
    assert tl.busy == {"ag": 6.0, "a2e": 2.0, "eg": 6.0, "e2a": 2.0}


def test_chunks_pipeline_through_link_and_experts():
    # r2 = 2: a2e [2,3] [3,4]; exp [3,6] [6,9]; e2a [6,7] [9,10]
    tl = simulate(findep_graph(2.0, 0.0, 3.0, 1.0, 1, 2, "ASAS", 1))
    assert tl.task("L0.m0.exp1") == (6.0, 9.0)
    assert tl.makespan == 10.0


def test_orders_place_shared_experts():
    g_asas = findep_graph(2.0, 1.0, 1.0, 0.5, 2, 1, "ASAS", 1)
    g_aass = findep_graph(2.0, 1.0, 1.0, 0.5, 2, 1, "AASS", 1)
    on_ag = lambda g: [t.name for t in g.tasks if t.resource == "ag"]  # noqa: E731
    assert on_ag(g_asas) == ["L0.m0.attn", "L0.m0.shared", "L0.m1.attn", "L0.m1.shared"]
    assert on_ag(g_aass) == ["L0.m0.attn", "L0.m1.attn", "L0.m0.shared", "L0.m1.shared"]
    # AASS sends micro-batch 1 to the EG one shared block earlier
    assert simulate(g_aass).task("L0.m1.a2e0")[0] == 4.0
    assert simulate(g_asas).task("L0.m1.a2e0")[0] == 5.0


@pytest.mark.parametrize("order", fd.ORDERS)
def test_closed_forms_track_the_simulator(order):
    rng = random.Random(0)
    ws = fd.optimality_sweep(layers=(2, 6), seq_lens=(2048,), max_seqs=(8,))
    worst = 0.0
    for _ in range(60):
        w = rng.choice(ws)
        m_a = rng.randint(1, w.max_m_a())
        r1 = rng.randint(1, max(1, min(8, w.max_r1_for(m_a))))
        r2 = rng.randint(w.min_r2_for(m_a), w.max_r2)
        pred = fd.predicted_time(w, m_a, r1, r2, order)
        sim = sim_time(w, m_a, r1, r2, order)
        worst = max(worst, abs(pred / sim - 1))
        if order == "ASAS":
            c = w.costs(m_a, r2)
            assert fd.published_asas_time(c, r1, r2, w.model.num_layers) >= sim - 1e-9
    assert worst < (1e-9 if order == "ASAS" else 0.01)


def test_schedule_graph_size_and_errors():
    w = fd.optimality_sweep(layers=(2,), seq_lens=(1024,), max_seqs=(4,))[0]
    g = schedule_graph(w, 1, 2, 3, "AASS")
    assert len(g) == 2 * 2 * (2 + 3 * 3)
    with pytest.raises(ConfigError, match="order"):
        findep_graph(1, 1, 1, 1, 1, 1, "SASA", 1)
    with pytest.raises(ConfigError, match="r2"):
        findep_graph(1, 1, 1, 1, 1, 0, "ASAS", 1)
