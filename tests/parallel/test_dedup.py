"""HierMoE dedup dispatcher on gloo ranks (world 4 as 2 nodes x 2).

Outputs and every gradient equal the single-device layer; the row bytes each link level
carries equal the dedup formula of ``moeflow.plan.hiermoe`` exactly.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch

from tests._dist import run_ranks
from tests.parallel.ep_cases import Case, build

pytestmark = pytest.mark.dist


def _equivalence(rank, world, case: Case, level, ranks_per_node=2, placement=None):
    """Max relative error of output and gradients vs the single-device layer."""
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    layer, cfg = build(case)
    tokens = case.tokens
    offs = [0, *itertools.accumulate(tokens)]
    torch.manual_seed(99)
    x_all = torch.randn(offs[-1], cfg.hidden_size)
    g_all = torch.randn(offs[-1], cfg.hidden_size)
    ref = copy.deepcopy(layer)
    xr = x_all.clone().requires_grad_(True)
    loss, ys = 0.0, []
    for r in range(world):
        y = ref(xr[offs[r] : offs[r + 1]])
        ys.append(y)
        loss = loss + (y * g_all[offs[r] : offs[r + 1]]).sum() + ref.aux_loss
    loss.backward()
    y_ref = torch.cat(ys)

    ep = ExpertParallel(
        copy.deepcopy(layer),
        topology=Topology.explicit(world, ranks_per_node),
        dispatcher="dedup",
        dispatcher_options={"level": level},
        r_fwd=case.r_fwd,
        r_bwd=case.r_bwd,
        timeout_s=30,
    )
    if placement is not None:
        ep.apply_placement(placement)
    from moeflow.parallel.dedup import local_experts

    mine = local_experts(ep.dispatcher)
    x = x_all[offs[rank] : offs[rank + 1]].clone().requires_grad_(True)
    y = ep(x)
    ((y * g_all[offs[rank] : offs[rank + 1]]).sum() + ep.aux_loss).backward()
    ep.sync_gradients("sum")
    checks = [
        ("output", y, y_ref[offs[rank] : offs[rank + 1]]),
        ("grad x", x.grad, xr.grad[offs[rank] : offs[rank + 1]]),
        ("grad w_in", ep.w_in.grad, ref.experts.w_in.grad[mine]),
        ("grad w_out", ep.w_out.grad, ref.experts.w_out.grad[mine]),
    ]
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        if name not in ("w_in", "w_out") and ref_params[name].grad is not None:
            checks.append((f"grad {name}", p.grad, ref_params[name].grad))
    worst = 0.0
    for what, got, want in checks:
        assert got is not None and got.shape == want.shape, (case, level, what)
        if got.numel():
            err = ((got - want).abs().max() / (want.abs().max() + 1e-6)).item()
            assert err < 2e-5, f"rank {rank} {case} level {level}: {what} rel err {err:.3g}"
            worst = max(worst, err)
    return worst, ep.dispatcher.last_level


CASES = [
    # top-2 with a shared expert, uneven counts and a rank with no tokens, 2 hops chunked
    (Case(router="softmax_topk", tokens=(13, 0, 21, 10), r_fwd=3, r_bwd=2), 1),
    (Case(router="softmax_topk", tokens=(13, 0, 21, 10), r_fwd=2, r_bwd=1), 0),
    # drop mode: the router's capacity limit, then dedup of the kept assignments
    (Case(router="softmax_topk", tokens=(9, 14, 5, 11), capacity_factor=1.0), 1),
    (Case(router="expert_choice", tokens=(12, 12, 12, 12), r_fwd=2, r_bwd=3), 1),
    (Case(router="deepseek", tokens=(7, 16, 0, 12)), "auto"),
    (Case(router="sigmoid", tokens=(11, 6, 9, 3), one_expert=True), "node"),
]


def _all_cases(rank, world):
    return [_equivalence(rank, world, c, lvl) for c, lvl in CASES]


def test_dedup_matches_single_device_world4():
    res = run_ranks(_all_cases, 4, timeout_s=240)
    assert all(err < 2e-5 for per_rank in res for err, _ in per_rank)
    levels = [lvl for _, lvl in res[0]]
    assert levels[:4] == [1, 0, 1, 1] and levels[5] == 1 and levels[4] in (0, 1)
    # every rank chose the same level for the auto case (same routing data everywhere)
    assert len({r[4][1] for r in res}) == 1


# -- bytes per link level --------------------------------------------------------------------
def _synthetic(world, T, E, k, dup, seed):
    """Routing of every rank: with probability ``dup`` a token's second expert sits on the
    same node as its first (duplication the node level can remove)."""
    g = torch.Generator().manual_seed(seed)
    per_node = E // 2
    out = []
    for s in range(world):
        tokens = []
        for _ in range(T[s]):
            first = int(torch.randint(E, (1,), generator=g))
            node = first // per_node
            if float(torch.rand((), generator=g)) < dup:
                pool = [e for e in range(node * per_node, (node + 1) * per_node) if e != first]
            else:
                pool = [e for e in range(E) if e // per_node != node]
            second = pool[int(torch.randint(len(pool), (1,), generator=g))]
            tokens.append(sorted({first, second})[:k])
        out.append(tokens)
    return out


def _bytes(rank, world, level, routes):
    import torch.distributed as dist

    from moeflow.comm import Topology
    from moeflow.comm.groups import subgroup
    from moeflow.kernels import expert_ffn
    from moeflow.layer.routers import Routing
    from moeflow.parallel import make_dispatcher
    from moeflow.parallel.expert_parallel import pipelined_experts

    E, D = 8, 16
    T = [len(r) for r in routes]
    topo = Topology.explicit(world, 2)
    a, j = divmod(rank, 2)
    d = make_dispatcher(
        "dedup",
        ep_group=None,
        ep_size=world,
        ep_rank=rank,
        esp_group=None,
        esp_size=1,
        esp_rank=0,
        num_local_experts=E // world,
        timeout_s=20,
        intra_group=subgroup(None, topo.node_ranks(a)),
        inter_group=subgroup(None, topo.peer_ranks(j)),
        ranks_per_node=2,
        level=level,
    )
    pairs = sorted((e, t) for t, es in enumerate(routes[rank]) for e in es)
    tok = torch.tensor([t for _, t in pairs], dtype=torch.long)
    exp = torch.tensor([e for e, _ in pairs], dtype=torch.long)
    torch.manual_seed(rank)
    w = torch.rand(len(pairs))
    routing = Routing(
        tok, exp, w, torch.bincount(exp, minlength=E), torch.zeros(()), torch.zeros(T[rank], E)
    )

    w_in = torch.randn(E // world, 8, D)
    w_out = torch.randn(E // world, D, 8)

    def ffn(x_MD, counts, wi, wo):
        return expert_ffn(x_MD, counts, wi, wo, "gelu", "loop")

    x = torch.randn(T[rank], D)
    with torch.no_grad():  # the dispatcher through the one pipeline, as ExpertParallel runs it
        x_in, weight = d.pipeline_input(x, routing)
        ex = d.exchange(routing.counts_E, routing=routing, tokens=x)
        y = pipelined_experts(d, ex, x_in, weight, w_in, w_out, ffn, 2, 2)
        y = d.pipeline_output(y, routing, T[rank])
    # the result is the weighted sum of this rank's expert outputs (all ranks' weights)
    assert y.shape == (T[rank], D)
    got = torch.tensor([d.bytes_sent["intra_node"], d.bytes_sent["inter_node"]])
    dist.all_reduce(got)
    return got.tolist(), routes


@pytest.mark.parametrize("dup", [0.0, 0.6, 1.0])
def test_wire_bytes_per_level_equal_the_dedup_formula(dup):
    from moeflow.plan.hiermoe import contiguous_owner, dedup_hops, flat_hops, level_bytes

    U, owner, row = [1, 2, 4], contiguous_owner(8, 4), 16 * 4
    routes = _synthetic(4, (17, 0, 23, 12), 8, 2, dup, seed=5)
    res0 = run_ranks(_bytes, 4, 0, routes, timeout_s=60)
    res1 = run_ranks(_bytes, 4, 1, routes, timeout_s=60)
    for level, res in ((0, res0), (1, res1)):
        want = level_bytes(dedup_hops(routes, owner, U, level), row)
        # dispatch and combine carry the same rows
        assert res[0][0] == [2 * want.get(1, 0), 2 * want.get(2, 0)], (level, dup)
    flat = level_bytes(flat_hops(routes, owner, U), row)
    node = level_bytes(dedup_hops(routes, owner, U, 1), row)
    if dup == 0.0:  # no two experts of a token share a node: nothing to remove
        assert node[2] == flat[2]
    else:  # inter-node bytes shrink by the duplicated rows
        assert node[2] < flat[2]
    if dup == 1.0:  # both experts on one node: exactly one inter-node row per remote token
        assert node[2] * 2 == flat[2]


def _eight(rank, world):
    cases = [
        (Case(router="softmax_topk", tokens=(9, 0, 14, 5, 11, 7, 3, 12), r_fwd=2, r_bwd=3), lvl)
        for lvl in (0, 1, "auto")
    ]
    out = [_equivalence(rank, world, c, lvl, ranks_per_node=4) for c, lvl in cases]
    swapped = [7, 1, 2, 3, 4, 5, 6, 0]  # experts 0 and 7 trade ranks (nodes)
    out += [
        _equivalence(rank, world, cases[0][0], lvl, ranks_per_node=4, placement=swapped)
        for lvl in (0, 1)
    ]
    return out


@pytest.mark.slow
def test_dedup_and_swapped_placement_match_single_device_8_ranks_as_2_nodes_of_4():
    res = run_ranks(_eight, 8, timeout_s=600)
    assert all(err < 2e-5 for per_rank in res for err, _ in per_rank)
    assert [lvl for _, lvl in res[0][:2]] == [0, 1]


def _trained_routing():
    """Routing of the first MoE layer of the demo model after a short training run."""
    from moeflow.models.demo import BatchSampler, DemoModelConfig, build_demo_model, load_corpus

    torch.manual_seed(0)
    model = build_demo_model(DemoModelConfig(num_layers=1), seed=0)
    sample = BatchSampler(load_corpus(max_bytes=200_000), seq_len=32, batch_size=8, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        x, y = sample()
        _, lm_loss, aux = model(x, y)
        opt.zero_grad()
        (lm_loss + aux).backward()
        opt.step()
        losses.append(lm_loss.item())
    layer = model.moe_layers()[0]
    seen = {}
    hook = layer.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(sample()[0])
        hook.remove()
        x_TD = seen["x"].reshape(-1, seen["x"].shape[-1])
        routing = layer.route(x_TD)
    per_token = [[] for _ in range(x_TD.shape[0])]
    for t, e in zip(routing.token_idx_N.tolist(), routing.expert_idx_N.tolist()):
        per_token[t].append(e)
    n = len(per_token) // 4
    return [per_token[i * n : (i + 1) * n] for i in range(4)], losses


def test_wire_bytes_equal_the_formula_on_a_trained_models_routing():
    from moeflow.plan.hiermoe import contiguous_owner, dedup_hops, level_bytes

    routes, losses = _trained_routing()
    assert losses[-1] < losses[0]  # it did train
    U, owner, row = [1, 2, 4], contiguous_owner(8, 4), 16 * 4
    for level in (0, 1):
        res = run_ranks(_bytes, 4, level, routes, timeout_s=60)
        want = level_bytes(dedup_hops(routes, owner, U, level), row)
        assert res[0][0] == [2 * want.get(1, 0), 2 * want.get(2, 0)], level


def _config_errors(rank, world):
    from moeflow.comm import Topology
    from moeflow.errors import ConfigError
    from moeflow.parallel import ExpertParallel

    layer, _ = build(Case())
    fields = []
    for kw in (
        dict(compress=True),
        dict(esp_size=2),
        dict(dispatcher_options={"level": 2}),
        dict(dispatcher_options={"level": "socket"}),
    ):
        try:
            ExpertParallel(
                copy.deepcopy(layer), topology=Topology.explicit(world, 2), dispatcher="dedup", **kw
            )
        except ConfigError as e:
            fields.append(e.field)
    ep = ExpertParallel(
        copy.deepcopy(layer), topology=Topology.explicit(world, 2), dispatcher="a2a"
    )
    try:
        ep.apply_placement(list(range(8)))
    except ConfigError as e:
        fields.append(e.field)
    ep = ExpertParallel(
        copy.deepcopy(layer), topology=Topology.explicit(world, 2), dispatcher="dedup"
    )
    ep.dispatcher.set_level("node")  # the level a plan chose
    assert ep.dispatcher.level == 1
    for bad in ("socket", 2, True):
        try:
            ep.dispatcher.set_level(bad)
        except ConfigError as e:
            fields.append(e.field)
    try:
        ep.apply_placement([0] * 8)  # rank 0 would own every expert
    except ConfigError as e:
        fields.append(e.field)
    return fields


def test_dedup_config_errors_name_the_field():
    res = run_ranks(_config_errors, 4, timeout_s=60)
    assert res[0] == ["compress", "esp_size", "level", "level", "dispatcher"] + ["level"] * 3 + [
        "owner_E"
    ]
