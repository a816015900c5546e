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


# -- plan_dedup: the level (or none) and the placement from earlier batches ------------------
MBIT100 = {1: (20e-6, 1 / 5e9), 2: (1e-3, 8 / 100e6)}  # loopback-class node, 100 Mbit/s


def _group_limited(seed, tokens=64, P=4, E=16, k=4, groups=4, topk_group=2):
    """DeepSeek-style routing: experts in ``groups`` contiguous groups, each token picks
    ``topk_group`` groups, then k experts among theirs."""
    import random

    rng = random.Random(seed)
    per = E // groups
    out = []
    for _ in range(P):
        rows = []
        for _ in range(tokens):
            gs = rng.sample(range(groups), topk_group)
            rows.append(rng.sample([g * per + i for g in gs for i in range(per)], k))
        out.append(rows)
    return out


def test_plan_dedup_picks_dedup_for_group_limited_routing():
    from moeflow.plan.hiermoe import PASSES, dedup_overhead, plan_dedup

    hist = [_group_limited(s) for s in range(3)]
    owner = contiguous_owner(16, 4)
    plan = plan_dedup(hist, owner, U, 512 * 4, MBIT100, expert_bytes=4 * 2 * 512 * 256 * 4)
    assert plan.level_name in ("rank", "node")
    assert plan.times_s[plan.level_name] < plan.times_s["none"]
    # "none" is the flat all-to-all priced the same way, on the check batch
    flat = PASSES * level_time(flat_hops(hist[-1], owner, U), 512 * 4, MBIT100) + 1e-3
    assert plan.times_s["none"] == pytest.approx(flat)
    assert dedup_overhead(hist[-1], U, MBIT100) > 0


def test_plan_dedup_picks_none_when_dedup_would_not_pay():
    from moeflow.plan.hiermoe import plan_dedup

    # top-1: nothing to deduplicate, and dedup still pays its routing all-gather
    hist = [_group_limited(s, k=1, topk_group=1) for s in range(3)]
    plan = plan_dedup(hist, contiguous_owner(16, 4), U, 512 * 4, MBIT100)
    assert plan.level is None and plan.level_name == "none" and plan.moved == 0
    assert plan.times_s["none"] < min(plan.times_s["rank"], plan.times_s["node"])
    # top-4 but rows of 8 bytes: the 20 routing bytes per assignment outweigh the saving
    hist = [_group_limited(s) for s in range(3)]
    plan = plan_dedup(hist, contiguous_owner(16, 4), U, 8, MBIT100)
    assert plan.level is None
    assert tuple(plan.owner) == tuple(contiguous_owner(16, 4))


def _paired(pair_b, batches, tokens=40):
    """Rank 0's tokens all use experts 0 (rank 0) and ``pair_b``; the others stay home."""
    return [[[[0, pair_b]] * tokens, [[4, 5]] * 8, [[8, 9]] * 8, [[12, 13]] * 8]] * batches


def test_plan_dedup_swaps_only_what_pays_on_the_check_batch():
    from moeflow.plan.hiermoe import plan_dedup, swap_time

    owner = contiguous_owner(16, 4)
    # a lasting pattern: rank 0 always needs expert 8 (rank 2); moving 8 next to 0 pays
    plan = plan_dedup(_paired(8, 3), owner, U, 2048, MBIT100, expert_bytes=1e5, horizon=50)
    assert plan.moved == 2 and plan.owner[8] == 0  # one swap: 8 in, one of rank 0's out
    assert plan.swap_s == pytest.approx(swap_time(owner, plan.owner, U, 1e5, MBIT100))
    # the same swap found on the search batches, but the check batch needs expert 12: no swap
    hist = _paired(8, 2) + _paired(12, 1)
    plan = plan_dedup(hist, owner, U, 2048, MBIT100, expert_bytes=1e5, horizon=50)
    assert plan.moved == 0 and list(plan.owner) == owner
    # a lasting pattern, but the move costs more than it saves over the horizon
    plan = plan_dedup(_paired(8, 3), owner, U, 2048, MBIT100, expert_bytes=1e9, horizon=2)
    assert plan.moved == 0


def test_swap_time_counts_moving_experts_once():
    from moeflow.plan.hiermoe import swap_time

    owner = contiguous_owner(8, 4)
    assert swap_time(owner, owner, U, 1e6, MBIT100) == 0.0
    new = list(owner)
    new[0], new[4] = owner[4], owner[0]  # rank 0 <-> rank 2: one expert each way, inter-node
    assert swap_time(owner, new, U, 1e6, MBIT100) == pytest.approx(1e-3 + 1e6 * 8 / 100e6)


def test_plan_levels_and_the_plans_dispatcher_include_none():
    from moeflow.plan.hiermoe import plan_dedup, plan_levels

    kw = dict(hidden=512, bytes_per_elem=4, ranks_per_node=2, num_ranks=4, tokens=64)
    kw.update(layers=1, links=MBIT100, num_experts=16)
    assert plan_levels(top_k=1, **kw)[0]["level"] == "none"
    row = plan_levels(top_k=4, **kw)[0]
    assert row["level"] in ("rank", "node")
    assert row["t_step_ms"][row["level"]] < row["t_step_ms"]["none"]
    hist = [_group_limited(s, k=1, topk_group=1) for s in range(2)]
    assert plan_dedup(hist, contiguous_owner(16, 4), U, 2048, MBIT100).dispatcher() == (
        "a2a",
        None,
    )
    plan = plan_dedup([_group_limited(0)], contiguous_owner(16, 4), U, 2048, MBIT100)
    assert plan.dispatcher() == ("dedup", {"level": plan.level})
