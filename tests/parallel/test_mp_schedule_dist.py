"""Parm schedules on gloo ranks: world 4 as 2 nodes x 2, MP = ESP = 2 (the node).

Every MP rank holds its node's batch. ``plain`` equals the single-device layer on that batch;
``split_rows`` (Parm's S2, split after the gate) equals it too; ``split_tokens`` (Parm's S1,
MP-Split) equals it on each split (routing acts on the batch a rank routes); outputs, input
gradients and every parameter gradient are compared. Both splits send 1/S of plain's
inter-node bytes. Parm's names ``s1`` / ``s2`` are accepted as aliases.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests._dist import run_ranks
from tests.parallel.ep_cases import ROUTER_CFGS, Case, _ws, build

pytestmark = pytest.mark.dist

BATCH = (14, 9)  # tokens of node 0 and node 1
SCHEDULES = ("plain", "split_tokens", "split_rows")


def _run(rank, world, case: Case, schedule: str):
    import torch.distributed as dist

    from moeflow.comm import Topology
    from moeflow.comm.groups import subgroup
    from moeflow.parallel import ExpertParallel
    from moeflow.parallel.mp_schedule import split_range

    layer, cfg = build(case)
    torch.manual_seed(7)
    xs = [torch.randn(T, cfg.hidden_size) for T in BATCH]
    gs = [torch.randn(T, cfg.hidden_size) for T in BATCH]
    node, s = divmod(rank, 2)

    ref = copy.deepcopy(layer)
    loss, y_ref, xr = 0.0, None, [x.clone().requires_grad_(True) for x in xs]
    for m in range(2):
        T = BATCH[m]
        split = schedule == "split_tokens"
        pieces = [split_range(T, 2, i) for i in range(2)] if split else [(0, T)]
        ys = []
        for lo, hi in pieces:
            y = ref(xr[m][lo:hi])
            ys.append(y)
            loss = loss + (y * gs[m][lo:hi]).sum() + ref.aux_loss
        if m == node:
            y_ref = torch.cat(ys)
    loss.backward()

    mp = subgroup(None, [2 * node, 2 * node + 1])
    ep = ExpertParallel(
        copy.deepcopy(layer),
        topology=Topology.explicit(world, 2),
        esp_size=2,
        mp_group=mp,
        schedule=schedule,
        r_fwd=case.r_fwd,
        r_bwd=case.r_bwd,
        timeout_s=30,
    )
    x = xs[node].clone().requires_grad_(True)
    y = ep(x)
    ((y * gs[node]).sum() + ep.aux_loss).backward()
    ep.sync_gradients("sum")
    gi, go = _ws(ref, ep)(ref.experts.w_in.grad, ref.experts.w_out.grad)
    checks = [
        ("output", y, y_ref),
        ("grad x", x.grad, xr[node].grad),
        ("grad w_in", ep.w_in.grad, gi),
        ("grad w_out", ep.w_out.grad, go),
    ]
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        if name not in ("w_in", "w_out") and ref_params[name].grad is not None:
            checks.append((f"grad {name}", p.grad, ref_params[name].grad))
    for what, got, want in checks:
        assert got is not None and got.shape == want.shape, (case, schedule, what)
        err = ((got - want).abs().max() / (want.abs().max() + 1e-6)).item()
        assert err < 2e-5, f"rank {rank} {case} {schedule}: {what} rel err {err:.3g}"
    inter = torch.tensor([float(ep.parm_bytes.get("inter_node", 0))])
    dist.all_reduce(inter)
    return ep.last_schedule, inter.item()


def _cases():
    cases = [(Case(router=r), sch) for r in ROUTER_CFGS for sch in SCHEDULES]
    # drop mode (capacity factor 1) and a chunked pipeline
    cases += [
        (Case(router="softmax_topk", capacity_factor=1.0, r_fwd=2, r_bwd=3), sch)
        for sch in SCHEDULES
    ]
    return cases


def _all(rank, world):
    return [_run(rank, world, c, sch) for c, sch in _cases()]


def test_parm_schedules_match_single_device_and_split_ones_send_1_over_S():
    res = run_ranks(_all, 4, timeout_s=240)
    cases = _cases()
    assert [r[0] for r in res[0]] == [sch for _, sch in cases]
    by = {(str(c), sch): inter for (c, sch), (_, inter) in zip(cases, res[0])}
    for c, sch in cases:
        if sch == "plain" and c.router != "expert_choice" and c.capacity_factor is None:
            # token-choice dropless: the same rows cross, S = 2 copies under plain
            plain, tok, rows = (by[(str(c), sch)] for sch in SCHEDULES)
            assert tok > 0 and plain == 2 * tok == 2 * rows, (str(c), plain, tok, rows)
        if sch == "plain":  # split_rows splits the same routing's rows: 1/S in any mode
            assert by[(str(c), "plain")] == 2 * by[(str(c), "split_rows")], str(c)


def _auto(rank, world):
    from moeflow.comm import Topology
    from moeflow.comm.groups import subgroup
    from moeflow.errors import ConfigError
    from moeflow.parallel import ExpertParallel
    from moeflow.plan.parm import ParmCluster

    layer, cfg = build(Case())
    node = rank // 2
    mp = subgroup(None, [2 * node, 2 * node + 1])
    slow_net = ParmCluster(alpha_intra=1e-6, beta_intra=1e-12, alpha_inter=1e-6, beta_inter=1e-8)
    latency = ParmCluster(alpha_intra=1.0, beta_intra=0.0, alpha_inter=0.0, beta_inter=0.0)
    chosen = []
    for cluster in (slow_net, latency):
        ep = ExpertParallel(
            copy.deepcopy(layer),
            topology=Topology.explicit(world, 2),
            esp_size=2,
            mp_group=mp,
            schedule="auto",
            parm_cluster=cluster,
            timeout_s=30,
        )
        torch.manual_seed(node)
        ep(torch.randn(10, cfg.hidden_size))
        chosen.append(ep.last_schedule)
    aliases = [
        ExpertParallel(
            copy.deepcopy(layer),
            topology=Topology.explicit(world, 2),
            esp_size=2,
            mp_group=mp,
            schedule=old,
        ).parm_schedule
        for old in ("s1", "s2")
    ]
    errors = []
    for kw in (
        dict(esp_size=2, mp_group=mp, schedule="s3"),
        dict(esp_size=1, mp_group=mp, schedule="s1"),
        dict(esp_size=2, schedule="s1"),
    ):
        try:
            ExpertParallel(copy.deepcopy(layer), topology=Topology.explicit(world, 2), **kw)
        except ConfigError as e:
            errors.append(e.field)
    return chosen, errors, aliases


def test_auto_follows_the_cost_model_and_bad_settings_are_config_errors():
    res = run_ranks(_auto, 4, timeout_s=60)
    # a slow network favours the split; a costly intra-node collective favours plain
    assert res[0][0] == ["split_tokens", "plain"]
    assert res[0][1] == ["schedule", "mp_group", "schedule"]
    # Parm's names still select the schedules, recorded under their role names
    assert res[0][2] == ["split_tokens", "split_rows"]
