"""HierMoE level choice: deduplicated message sizes (Eq. 4-5), t_d (Eq. 3) and d* (Eq. 6)."""

import pytest

from moeflow.errors import ConfigError
from moeflow.plan.hiermoe import (
    best_level,
    check_group_sizes,
    choose_level,
    contiguous_owner,
    dedup_hops,
    duplication_rate,
    flat_hops,
    level_bytes,
    level_time,
    link_level,
)

U = [1, 2, 4]  # 4 ranks, 2 per node
OWNER = contiguous_owner(8, 4)  # rank p owns experts 2p, 2p+1


def test_link_levels_and_group_sizes():
    assert [link_level(0, b, U) for b in range(4)] == [0, 1, 2, 2]
    assert check_group_sizes([1, 4, 8, 16, 32]) == [1, 4, 8, 16, 32]
    for bad in ([2, 4], [1, 3, 4], [1], [1, 4, 2]):
        with pytest.raises(ConfigError):
            check_group_sizes(bad)


def test_hand_counted_rows():
    # rank 0's one token goes to experts 4, 5 (rank 2) and 6 (rank 3): all on node 1
    routes = [[[4, 5, 6]], [], [], []]
    flat = level_bytes(flat_hops(routes, OWNER, U), 1)
    assert flat == {2: 3}  # one inter-node row per assignment
    rank = level_bytes(dedup_hops(routes, OWNER, U, 0), 1)
    assert rank == {2: 2}  # one per destination rank
    node = dedup_hops(routes, OWNER, U, 1)
    # hop 1: one row to relay 2 (node 1, rank 0's position); hop 2: relay 2 -> rank 3
    assert [h.rows for h in node] == [({2: 1}, {}, {}, {}), ({}, {}, {1: 1}, {})]
    assert level_bytes(node, 10) == {2: 10, 1: 10}
    assert duplication_rate(routes, OWNER, U, 1) == pytest.approx(1 - 2 / 3)


def test_local_experts_cost_nothing_and_level_zero_has_one_hop():
    routes = [[[0, 1]], [[2, 3]], [], []]  # every token stays on its own rank
    assert level_bytes(dedup_hops(routes, OWNER, U, 0), 4) == {}
    assert len(dedup_hops(routes, OWNER, U, 0)) == 1
    assert len(dedup_hops(routes, OWNER, U, 1)) == 2


def test_level_choice_follows_the_links():
    # heavy node-local duplication: every token of rank 0 hits all 4 experts of node 1
    routes = [[[4, 5, 6, 7]] * 50, [], [], []]
    links = {1: (1e-6, 1e-11), 2: (1e-5, 1e-9)}  # slow network: dedup at the node wins
    d, times = choose_level(routes, OWNER, U, 1024, links)
    assert d == 1 and times[1] < times[0]
    fast_net = {1: (1e-6, 1e-9), 2: (1e-6, 1e-9)}  # links alike: the extra hop costs more
    d, times = choose_level(routes, OWNER, U, 1024, fast_net)
    assert d == 0 and times[0] < times[1]
    # the time of one hop is alpha + beta * the largest message of its slowest link
    hops = dedup_hops(routes, OWNER, U, 0)
    assert level_time(hops, 1024, links) == pytest.approx(1e-5 + 100 * 1024 * 1e-9)
    assert best_level([3.0, 3.0]) == 0


def test_bad_inputs_are_config_errors():
    with pytest.raises(ConfigError):
        dedup_hops([[[0]]], OWNER, U, 0)  # one rank's routing for 4 ranks
    with pytest.raises(ConfigError):
        dedup_hops([[], [], [], []], OWNER, U, 2)
    with pytest.raises(ConfigError):
        contiguous_owner(6, 4)
    with pytest.raises(ConfigError):
        level_time(dedup_hops([[[4]], [], [], []], OWNER, U, 0), 8, {1: (0.0, 0.0)})


def test_plan_cli_method_hiermoe(capsys):
    import argparse
    import json

    from moeflow.cli import plan as cli

    p = argparse.ArgumentParser()
    cli.add_plan_arguments(p)
    argv = [
        "--method",
        "hiermoe",
        "--model",
        "qwen3-30b-a3b",
        "--cluster",
        "fsmoe-testbed-b",
        "--esp",
        "1",
        "--tokens",
        "1024",
        "--layers",
        "2",
        "--json",
    ]
    assert cli.run_plan(p.parse_args(argv)) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["method"] == "hiermoe" and len(d["rows"]) == 2
    for row in d["rows"]:
        # top-8 of 128 experts on 8 nodes x 4: many tokens hit 2+ experts of one node
        assert row["level"] == "node"
        assert min(row["t_levels_ms"]) == row["t_levels_ms"][1] < row["t_flat_ms"]
    with pytest.raises(ConfigError):  # 8 experts cannot spread over 32 EP ranks
        cli.run_plan(
            p.parse_args(
                [
                    "--method",
                    "hiermoe",
                    "--model",
                    "mixtral-8x7b",
                    "--cluster",
                    "fsmoe-testbed-b",
                    "--esp",
                    "1",
                ]
            )
        )


def test_simulated_a2a_of_each_schedule():
    from moeflow.plan.hiermoe_sim import PRESETS, a2a_ms, schedules_ms, tutel_2dh_hops

    cl = PRESETS["hiermoe-32gpu"]
    U = list(cl.U)
    owner = contiguous_owner(64, 32)
    # every token hits 4 experts on 4 ranks of the upper half (ranks 16..31)
    routes = [[[32, 40, 48, 56]] * 256 for _ in range(32)]
    ms = schedules_ms(routes, owner, cl, 4096)
    # dedup at level 3 crosses the spine (level 4) once per token instead of 4 times
    spine = {d: level_bytes(dedup_hops(routes, owner, U, d), 1).get(4, 0) for d in range(4)}
    assert spine[3] * 4 == level_bytes(flat_hops(routes, owner, U), 1)[4] == spine[0]
    assert ms["dedup3"] < ms["flat"] and ms["dedup3"] < ms["2dh"]
    # 2DH carries every assignment across the network once: no fewer inter rows than flat
    inter2dh = level_bytes(tutel_2dh_hops(routes, owner, U), 1)[4]
    assert inter2dh == level_bytes(flat_hops(routes, owner, U), 1)[4]
    # a hop costs the alpha-beta time of its slowest level
    hops = dedup_hops(routes, owner, U, 0)
    a, b = cl.links[4]
    assert a2a_ms(hops, 4096, cl.links) == pytest.approx(
        max(
            (cl.links[k][0] + hops[0].max_rank(k) * 4096 * cl.links[k][1]) * 1e3
            for k in hops[0].links()
        )
    )
    assert a > 0 and b > 0
