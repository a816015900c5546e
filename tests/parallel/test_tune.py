"""tune_degrees: pipeline degrees chosen by measuring candidates on warm-up batches."""

from __future__ import annotations

import pytest

from tests._dist import run_ranks

pytestmark = pytest.mark.dist


def _tune(rank, world, slow_pair):
    import time

    import torch

    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel
    from moeflow.parallel.tune import tune_degrees

    cfg = MoEConfig(hidden_size=16, ffn_hidden_size=32, num_experts=4, top_k=2)
    torch.manual_seed(0)
    ep = ExpertParallel(MoELayer(cfg), topology=Topology.explicit(world, 1), r_fwd=1, r_bwd=1)
    gen = torch.Generator().manual_seed(rank)
    batches = [torch.randn(24, 16, generator=gen) for _ in range(2)]
    # gradients that exist before tuning are kept as they were
    ep(batches[0]).sum().backward()
    before = {n: p.grad.clone() for n, p in ep.named_parameters() if p.grad is not None}
    # one candidate is made slow on one rank only: the slowest rank's time must count
    forward = ep.forward

    def slow_forward(x, *a, **kw):
        if rank == 1 and (ep.r_fwd, ep.r_bwd) == slow_pair:
            time.sleep(0.05)
        return forward(x, *a, **kw)

    ep.forward = slow_forward
    res = tune_degrees(ep, batches, candidates=[(1, 1), (2, 2), (2, 1)], rounds=3)
    ep.forward = forward
    after = {n: p.grad.clone() for n, p in ep.named_parameters() if p.grad is not None}
    same_grads = before.keys() == after.keys() and all(
        torch.equal(before[n], after[n]) for n in before
    )
    return (
        (res.r_fwd, res.r_bwd),
        (ep.r_fwd, ep.r_bwd),
        [((t.r_fwd, t.r_bwd), t.ms) for t in res.trials],
        same_grads,
    )


def test_tune_picks_the_fastest_measured_pair_on_every_rank():
    res = run_ranks(_tune, 2, (1, 1), timeout_s=120)
    (pick0, applied0, trials0, grads0), (pick1, applied1, trials1, grads1) = res
    # every rank agrees, and the figures are the slowest rank's (identical on both)
    assert pick0 == pick1 == applied0 == applied1
    assert trials0 == trials1
    assert grads0 and grads1
    med = {pair: sorted(ms)[1] for pair, ms in trials0}
    assert pick0 == min(med, key=med.get)
    # rank 1 slept 2 x 50 ms per round in (1, 1): it is never picked, its rounds show it
    assert pick0 != (1, 1)
    assert min(dict(trials0)[(1, 1)]) >= 100.0
    assert all(len(ms) == 3 for _, ms in trials0)


def test_tune_refuses_bad_input():
    from moeflow.errors import ConfigError
    from moeflow.parallel.tune import degree_candidates

    assert degree_candidates((3, 5)) == [(3, 5), (1, 1), (2, 2), (4, 4), (8, 8)]
    assert degree_candidates((2, 2)) == [(2, 2), (1, 1), (4, 4), (8, 8)]
    for bad in [(0, 1), (1,), (1.5, 2), (True, 1), "22"]:
        with pytest.raises(ConfigError):
            degree_candidates(bad)


def test_tune_refuses_no_batches_and_bad_rounds():
    import torch

    from moeflow.errors import ConfigError, InputError
    from moeflow.parallel.tune import tune_degrees

    with pytest.raises(InputError):
        tune_degrees(None, [])
    for rounds in (0, 1.0, True):
        with pytest.raises(ConfigError):
            tune_degrees(None, [torch.zeros(2, 2)], rounds=rounds)
    with pytest.raises(ConfigError):
        tune_degrees(None, [torch.zeros(2, 2)], candidates=[(1, 1), (1, 1)])
