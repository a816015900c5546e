"""Parm's α-β schedule model: each term from its schedule, and the automatic choice."""

import pytest

from moeflow.errors import ConfigError
from moeflow.plan.parm import (
    ParmCluster,
    ParmLayer,
    choose_schedule,
    inter_node_bytes,
    schedule_terms,
    schedule_time,
)

LAYER = ParmLayer(tokens=4096, hidden=1024, top_k=2, mp=4, nodes=4, bytes_per_elem=2)


def test_split_divides_the_network_bytes_by_S():
    assert inter_node_bytes(LAYER, "s1") * 4 == inter_node_bytes(LAYER, "plain")
    # plain: S ranks each send k*T rows, 3/4 of them leave the node, dispatch + combine
    assert inter_node_bytes(LAYER, "plain") == 2 * 4 * 2 * 4096 * 1024 * 2 * 3 / 4


def test_terms_follow_the_schedules():
    c = ParmCluster(
        alpha_intra=1e-6, beta_intra=1e-11, alpha_inter=1e-5, beta_inter=1e-10, row_time=1e-7
    )
    plain, s1 = schedule_terms(LAYER, c, "plain"), schedule_terms(LAYER, c, "s1")
    rows = 2 * 4096
    assert plain["a2a"] == pytest.approx(2 * (1e-5 + 1e-10 * rows * 2048 * 0.75))
    assert plain["esp"] == pytest.approx(2 * (1e-6 + 1e-11 * 3 * rows * 2048))
    assert plain["experts"] == pytest.approx(rows * 1e-7)
    assert plain["mp_allgather"] == 0.0
    assert s1["experts"] == pytest.approx(plain["experts"] / 4)
    assert s1["mp_allgather"] == pytest.approx(1e-6 + 1e-11 * 3 * 1024 * 2048)
    # one chunk: the plain sum of the terms
    assert schedule_time(LAYER, c, "s1") == pytest.approx(sum(s1.values()))
    # chunks overlap the two sides: never slower than the sum when alpha is small
    assert schedule_time(LAYER, c, "plain", r=4) < schedule_time(LAYER, c, "plain")


def test_choice_depends_on_the_cluster():
    slow_net = ParmCluster(beta_inter=1e-9)
    assert choose_schedule(LAYER, slow_net)[0] == "s1"
    tiny = ParmLayer(tokens=4, hidden=8, top_k=1, mp=2, nodes=2)
    costly_collective = ParmCluster(
        alpha_intra=1e-3, beta_intra=0.0, alpha_inter=0.0, beta_inter=0.0
    )
    name, times = choose_schedule(tiny, costly_collective)
    assert name == "plain" and times["plain"] < times["s1"]


def test_bad_inputs():
    with pytest.raises(ConfigError):
        schedule_terms(LAYER, ParmCluster(), "s3")
    with pytest.raises(ConfigError):
        ParmLayer(tokens=0, hidden=8, top_k=1, mp=2, nodes=2)


def test_plan_cli_method_parm(capsys):
    import argparse

    from moeflow.cli import plan as cli

    p = argparse.ArgumentParser()
    cli.add_plan_arguments(p)
    argv = [
        "--method",
        "parm",
        "--model",
        "mixtral-8x7b",
        "--cluster",
        "fsmoe-testbed-a",
        "--tokens",
        "4096",
        "--layers",
        "3",
    ]
    assert cli.run_plan(p.parse_args(argv)) == 0
    out = capsys.readouterr().out
    assert out.count("schedule s1") == 3 and "plain" in out


@pytest.mark.parametrize("tokens,hidden,mp", [(4096, 1024, 4), (1024, 512, 2), (8192, 4096, 8)])
def test_formula_agrees_with_the_simulator(tokens, hidden, mp):
    from moeflow.plan.parm_sim import PRESETS, expert_row_time, layer_ms

    pre = PRESETS["parm-32gpu"]
    layer = ParmLayer(tokens=tokens, hidden=hidden, top_k=2, mp=mp, nodes=4)
    c = ParmCluster(
        alpha_intra=pre.cluster.alpha_intra,
        beta_intra=pre.cluster.beta_intra,
        alpha_inter=pre.cluster.alpha_inter,
        beta_inter=pre.cluster.beta_inter,
        row_time=expert_row_time(hidden, 4 * hidden, pre.flops),
        gate_time=1e-8,
    )
    for sch in ("plain", "s1", "s2"):
        # one chunk: the derivation is exact
        assert layer_ms(layer, c, sch, 1) == pytest.approx(schedule_time(layer, c, sch) * 1e3)
        for r in (2, 4, 8):  # pipelined: an estimate, within 15% of the task graph
            sim, model = layer_ms(layer, c, sch, r), schedule_time(layer, c, sch, r) * 1e3
            assert 0.85 <= sim / model <= 1.0 + 1e-9, (sch, r, sim, model)


def test_cluster_from_perf_reads_the_profiled_links_and_expert_costs():
    import pytest

    from moeflow.errors import ConfigError
    from moeflow.perf import LinearCost, PerfModel
    from moeflow.plan.parm import cluster_from_perf

    costs = {
        "gemm": LinearCost(0.0, 1e-9),
        "a2a": LinearCost(0.5, 4e-6),
        "a2a@intra": LinearCost(0.1, 1e-6),  # 2 ranks per node: half the buffer crosses
        "a2a@inter": LinearCost(2.0, 8e-6),  # 2 nodes
        "expert_fwd@float32": LinearCost(0.3, 2e-8),
        "gemm@float32": LinearCost(0.0, 1e-8),
    }
    perf = PerfModel("p", costs, meta={"world_size": 4, "nodes": 2})
    c = cluster_from_perf(perf, hidden=64, ffn=128, num_experts=8, dtype="float32")
    assert (c.alpha_intra, c.beta_intra) == (pytest.approx(1e-4), pytest.approx(2e-9))
    assert (c.alpha_inter, c.beta_inter) == (pytest.approx(2e-3), pytest.approx(1.6e-8))
    assert c.row_time == pytest.approx(2e-8 * 6 * 64 * 128 * 1e-3)
    assert c.gate_time == pytest.approx(1e-8 * 2 * 64 * 8 * 1e-3)
    with pytest.raises(ConfigError, match="expert_fwd@bfloat16"):
        cluster_from_perf(perf, hidden=64, ffn=128, num_experts=8, dtype="bfloat16")
