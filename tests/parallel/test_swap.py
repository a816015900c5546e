"""HierMoE expert swap: non-contiguous placements, the swap search, and apply_placement
moving expert weights and optimizer state with no change to the layer's function."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from moeflow.plan.hiermoe import contiguous_owner, rank_rows, swap_step
from tests._dist import run_ranks
from tests.parallel.ep_cases import Case, build


def test_swap_search_incremental_counts_match_a_recount_and_time_never_rises():
    random.seed(3)
    P, E, U = 4, 8, [1, 2, 4]
    routes = [[random.sample(range(E), 2) for _ in range(30)] for _ in range(P)]
    owner, state, times = contiguous_owner(E, P), None, []
    for _ in range(4):
        pair, owner, t, state = swap_step(routes, owner, U, 256, state=state)
        assert state.rows == rank_rows(routes, owner, P)  # incremental == from scratch
        times.append(t)
        assert sorted(owner.count(p) for p in range(P)) == [2] * P
    assert times == sorted(times, reverse=True)


def test_swap_search_finds_the_obvious_pair():
    # every token of rank 0 uses experts 0 (rank 0) and 2 (rank 1): moving 2 next to 0
    # removes all of rank 0's traffic; the best swap puts expert 2 on rank 0
    routes = [[[0, 2]] * 40, [], [], []]
    pair, owner, t, _ = swap_step(routes, contiguous_owner(8, 4), [1, 2, 4], 64)
    assert 2 in pair and owner[2] == 0 and t == 0.0


def _check(rank, what, got, want):
    assert got.shape == want.shape, (rank, what)
    if got.numel() == 0:
        return
    err = ((got - want).abs().max() / (want.abs().max() + 1e-6)).item()
    assert err < 2e-5, f"rank {rank}: {what} rel err {err:.3g}"


def _swapped_equivalence(rank, world):
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel
    from moeflow.parallel.dedup import local_experts

    layer, cfg = build(Case(router="softmax_topk"))
    tokens = (10, 7, 0, 13)
    torch.manual_seed(5)
    xs = [torch.randn(T, cfg.hidden_size) for T in tokens]
    gs = [torch.randn(T, cfg.hidden_size) for T in tokens]
    ref = copy.deepcopy(layer)
    xr = [x.clone().requires_grad_(True) for x in xs]
    loss = sum((ref(x) * g).sum() + ref.aux_loss for x, g in zip(xr, gs))
    y_ref = ref(xr[rank]).detach()
    loss.backward()
    placement = [3, 0, 2, 1, 1, 2, 0, 3]
    out = []
    for level in (0, 1):
        ep = ExpertParallel(
            copy.deepcopy(layer),
            topology=Topology.explicit(world, 2),
            dispatcher="dedup",
            dispatcher_options={"level": level},
            r_fwd=2,
            timeout_s=30,
        )
        ep.apply_placement(placement)  # weights move before the first step
        mine = local_experts(ep.dispatcher)
        assert mine == [e for e in range(8) if placement[e] == rank]
        full_in, full_out = ep.full_expert_weights()  # the checkpoint view: by expert id
        assert torch.equal(full_in, layer.experts.w_in) and torch.equal(
            full_out, layer.experts.w_out
        )
        x = xs[rank].clone().requires_grad_(True)
        y = ep(x)
        ((y * gs[rank]).sum() + ep.aux_loss).backward()
        ep.sync_gradients("sum")
        _check(rank, "output", y, y_ref)
        _check(rank, "grad x", x.grad, xr[rank].grad)
        _check(rank, "grad w_in", ep.w_in.grad, ref.experts.w_in.grad[mine])
        _check(rank, "grad w_out", ep.w_out.grad, ref.experts.w_out.grad[mine])
        _check(rank, "grad router", ep.router.weight.grad, ref.router.weight.grad)
        out.append(mine)
    return out


@pytest.mark.dist
def test_swapped_placement_matches_single_device_world4():
    res = run_ranks(_swapped_equivalence, 4, timeout_s=120)
    assert [r[0] for r in res] == [[1, 6], [3, 4], [2, 5], [0, 7]]


def _train(rank, world, steps, swap):
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel
    from moeflow.plan.hiermoe import swap_step as step_search

    layer, cfg = build(Case(router="softmax_topk", experts=8))
    ep = ExpertParallel(
        layer,
        topology=Topology.explicit(world, 2),
        dispatcher="dedup",
        dispatcher_options={"level": "auto"},
        timeout_s=30,
    )
    opt = torch.optim.Adam(ep.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(100 + rank)
    owner = contiguous_owner(8, world)
    losses, swaps = [], 0
    for i in range(steps):
        x = torch.randn(12, cfg.hidden_size, generator=gen)
        target = torch.randn(12, cfg.hidden_size, generator=gen)
        opt.zero_grad()
        loss = ((ep(x) - target) ** 2).mean() + ep.aux_loss
        loss.backward()
        ep.sync_gradients("mean")
        opt.step()
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        losses.append(total.item())
        if swap:
            pair, new, _, _ = step_search(
                ep.dispatcher.last_assignments(), owner, [1, 2, world], 4 * cfg.hidden_size
            )
            if pair is None:  # a swap every step: fall back to a fixed cross-rank pair
                new = list(owner)
                a, b = i % 8, (i + 2) % 8
                new[a], new[b] = owner[b], owner[a]
            swaps += new != owner
            owner = new
            ep.apply_placement(owner, opt)
    return losses, swaps


def _curves(rank, world, steps):
    return _train(rank, world, steps, False), _train(rank, world, steps, True)


@pytest.mark.dist
def test_swaps_every_step_keep_the_loss_curve_short():
    res = run_ranks(_curves, 4, 8, timeout_s=120)
    (plain, _), (swapped, n) = res[0]
    assert n == 8
    assert max(abs(a - b) for a, b in zip(plain, swapped)) <= 1e-5 * max(map(abs, plain))
    assert plain[-1] < plain[0]  # it trains


@pytest.mark.slow
@pytest.mark.dist
def test_swaps_every_step_keep_the_loss_curve_50_steps():
    res = run_ranks(_curves, 4, 50, timeout_s=600)
    (plain, _), (swapped, n) = res[0]
    assert n == 50
    assert max(abs(a - b) for a, b in zip(plain, swapped)) <= 1e-5 * max(map(abs, plain))


def _by_expert(ep, t):
    """A tensor of the local experts (first dim = local slot) of every rank, by expert id."""
    full = [torch.empty_like(t) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(full, t.detach().contiguous())
    return torch.cat(full)[ep.dispatcher.expert_rows()]


def _expert_state(ep, opt):
    """Weights and Adam moments of every expert, by expert id (the same on every rank)."""
    out = {}
    for name, p in (("w_in", ep.w_in), ("w_out", ep.w_out)):
        out[name] = _by_expert(ep, p)
        for k in ("exp_avg", "exp_avg_sq"):
            out[f"{name}.{k}"] = _by_expert(ep, opt.state[p][k])
    return out


# from contiguous [0, 0, 1, 1, 2, 2, 3, 3]: experts 0 (0 -> 1) and 3 (1 -> 0) move inside
# node 0, 2 (1 -> 2) and 4 (2 -> 1) between the nodes; rank 3 keeps its experts
NEW_PLACEMENT = [1, 0, 2, 0, 1, 2, 3, 3]


def _swap_mid_training(rank, world, steps_before, steps_after):
    from moeflow.comm import Topology
    from moeflow.comm import bytes as comm_bytes
    from moeflow.parallel import ExpertParallel
    from moeflow.parallel.dedup import local_experts

    layer, cfg = build(Case(router="softmax_topk", experts=8))
    topo = Topology.explicit(world, 2)

    def make():
        ep = ExpertParallel(
            copy.deepcopy(layer),
            topology=topo,
            dispatcher="dedup",
            dispatcher_options={"level": "auto"},
            timeout_s=30,
        )
        return ep, torch.optim.Adam(ep.parameters(), lr=1e-2)

    def steps(ep, opt, n, gen):
        for _ in range(n):
            x = torch.randn(12, cfg.hidden_size, generator=gen)
            target = torch.randn(12, cfg.hidden_size, generator=gen)
            opt.zero_grad()
            (((ep(x) - target) ** 2).mean() + ep.aux_loss).backward()
            ep.sync_gradients("mean")
            opt.step()

    # A: contiguous placement, swap mid-training (weights, gradients and Adam state move)
    ep_a, opt_a = make()
    gen = torch.Generator().manual_seed(100 + rank)
    steps(ep_a, opt_a, steps_before, gen)
    before = _expert_state(ep_a, opt_a)
    grads = {n: _by_expert(ep_a, p.grad) for n, p in (("w_in", ep_a.w_in), ("w_out", ep_a.w_out))}
    with comm_bytes.count(topo) as c:
        sent = ep_a.apply_placement(NEW_PLACEMENT, opt_a)
    mine = local_experts(ep_a.dispatcher)
    assert mine == [e for e in range(8) if NEW_PLACEMENT[e] == rank]
    # the swap itself is exact: every local tensor is the old one of its expert
    for name, p in (("w_in", ep_a.w_in), ("w_out", ep_a.w_out)):
        assert torch.equal(p.data, before[name][mine])
        assert torch.equal(p.grad, grads[name][mine])
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt_a.state[p][k], before[f"{name}.{k}"][mine])
    # bytes: the experts leaving this rank, each with weights, gradients and two moments
    per_expert = 4 * (ep_a.w_in[0].numel() + ep_a.w_out[0].numel()) * 4  # fp32, 4 tensors
    want: dict[str, int] = {}
    for e in range(8):
        old, new = e // 2, NEW_PLACEMENT[e]
        if old == rank and new != rank:
            lv = "intra_node" if old // 2 == new // 2 else "inter_node"
            want[lv] = want.get(lv, 0) + per_expert
    assert sent == want
    assert c.by_level == want
    assert c.by_op == ({"expert_swap": sum(want.values())} if want else {})
    steps(ep_a, opt_a, steps_after, gen)

    # B: the new placement from the start, the same batches
    ep_b, opt_b = make()
    ep_b.apply_placement(NEW_PLACEMENT)
    gen = torch.Generator().manual_seed(100 + rank)
    steps(ep_b, opt_b, steps_before + steps_after, gen)
    a, b = _expert_state(ep_a, opt_a), _expert_state(ep_b, opt_b)
    for k in a:
        err = ((a[k] - b[k]).abs().max() / b[k].abs().max()).item()
        assert err < 1e-5, f"rank {rank}: {k} differs by {err:.3g} (relative)"
    return sent


@pytest.mark.dist
def test_swap_mid_training_equals_the_new_placement_from_the_start():
    res = run_ranks(_swap_mid_training, 4, 2, 2, timeout_s=120)
    assert [sorted(r) for r in res] == [
        ["intra_node"],
        ["inter_node", "intra_node"],
        ["inter_node"],
        [],
    ]
