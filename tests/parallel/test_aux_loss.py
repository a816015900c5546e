"""The global-batch load-balancing loss (``moeflow.parallel.aux_loss``): on 2 and 4 gloo
ranks, every rank's aux loss equals the single-device layer's aux loss on the concatenated
batch, and so do its gradients (router: the mean over ranks; layer input: the rank's rows,
times W under the mean convention); the per-rank default is a different loss. Also the
whole-model option ``parallelize(..., aux_loss="global")`` and its typed errors."""

from __future__ import annotations

import copy

import pytest
import torch

from tests._dist import run_ranks
from tests.parallel.ep_cases import Case, build

pytestmark = pytest.mark.dist

CASES = [
    Case(router="softmax_topk"),  # load balancing + z-loss, shared expert
    Case(router="switch", capacity_factor=1.0),  # top-1 with drops (f counts before drops)
    Case(router="deepseek", extra=dict(aux_loss_coef=0.02)),  # normalised sigmoid scores
    Case(router="expert_choice", extra=dict(z_loss_coef=1e-2)),  # z-loss only
    Case(router="softmax_topk", tokens=(12, 0, 7, 5)),  # a rank without tokens
]


def _aux_rank(rank, world, cases, use_global):
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel
    from moeflow.parallel.aux_loss import use_global_aux_loss

    out = []
    for case in cases:
        if case.tokens and len(case.tokens) != world:
            out.append(None)
            continue
        layer, cfg = build(case)
        tokens = case.tokens or (12,) * world
        torch.manual_seed(99)
        x_all = torch.randn(sum(tokens), cfg.hidden_size)
        lo = sum(tokens[:rank])
        ep = ExpertParallel(
            copy.deepcopy(layer), topology=Topology.explicit(world, world), timeout_s=30
        )
        if use_global:
            assert use_global_aux_loss(ep, None, 30) == 1
        x = x_all[lo : lo + tokens[rank]].clone().requires_grad_(True)
        ep(x)
        ep.aux_loss.backward()
        ep.sync_gradients("mean")
        grads = {n: p.grad.clone() for n, p in ep.router.named_parameters() if p.grad is not None}
        out.append((ep.aux_loss.item(), grads, x.grad.clone() if x.grad is not None else None))
    return out


def _reference(case: Case):
    layer, cfg = build(case)
    tokens = case.tokens or (12,) * 4
    torch.manual_seed(99)
    x_all = torch.randn(sum(tokens), cfg.hidden_size)
    return layer, x_all, tokens


@pytest.mark.parametrize("world", [2, 4])
def test_global_aux_loss_and_gradients_equal_single_device_on_the_whole_batch(world):
    glob = run_ranks(_aux_rank, world, CASES, True, timeout_s=120)
    local = run_ranks(_aux_rank, world, CASES, False, timeout_s=120)
    for i, case in enumerate(CASES):
        if case.tokens and len(case.tokens) != world:
            continue
        layer, cfg = build(case)
        tokens = case.tokens or (12,) * world
        torch.manual_seed(99)
        x_all = torch.randn(sum(tokens), cfg.hidden_size).requires_grad_(True)
        layer(x_all)  # the single-device layer on the concatenated batch
        layer.aux_loss.backward()
        want = layer.aux_loss.item()
        ref_grads = {n: p.grad for n, p in layer.router.named_parameters() if p.grad is not None}
        assert want > 0 and ref_grads, case
        local_vals = []
        for rank in range(world):
            aux, grads, gx = glob[rank][i]
            assert abs(aux - want) <= 1e-6 * max(1.0, abs(want)), (case, rank, aux, want)
            assert set(grads) == set(ref_grads), case
            for n, g in grads.items():  # the mean over ranks (sync_gradients) is exact
                torch.testing.assert_close(g, ref_grads[n], atol=1e-8, rtol=1e-5, msg=str(case))
            lo = sum(tokens[:rank])
            want_x = x_all.grad[lo : lo + tokens[rank]] * world
            if tokens[rank]:
                torch.testing.assert_close(gx, want_x, atol=1e-9, rtol=1e-5, msg=str(case))
            local_vals.append(local[rank][i][0])
        # the per-rank default is another objective: its values and gradients differ
        assert max(abs(v - want) for v in local_vals) > 1e-4 * want, (case, local_vals, want)
        if case.router != "expert_choice":
            # (a z-loss alone is a mean over tokens: with equal batches the mean of the
            # ranks' gradients is already the global one; the load-balancing loss is not)
            name = next(iter(ref_grads))
            mean = sum(local[r][i][1][name] for r in range(world)) / world
            assert not torch.allclose(mean, ref_grads[name], atol=1e-8, rtol=1e-3), case


def test_bad_aux_loss_options_raise_config_errors():
    from moeflow.errors import ConfigError
    from moeflow.parallel.aux_loss import check_aux_loss, use_global_aux_loss

    assert check_aux_loss("global") == "global"
    with pytest.raises(ConfigError, match="aux_loss"):
        check_aux_loss("batch")
    with pytest.raises(ConfigError, match="Parm"):
        check_aux_loss("global", "split_tokens")
    with pytest.raises(ConfigError, match="routers"):
        use_global_aux_loss(torch.nn.Linear(2, 2))


def test_global_aux_loss_on_one_process_is_the_layer_loss():
    """A group of one rank: the global statistics are this batch's, value and gradient."""
    import torch.distributed as dist

    from moeflow.parallel.aux_loss import use_global_aux_loss, use_local_aux_loss

    layer, x_all, _ = _reference(Case(router="softmax_topk"))
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ref = copy.deepcopy(layer)
        ref(x_all)
        ref.aux_loss.backward()
        use_global_aux_loss(layer)
        assert layer.router.aux_reduce is not None
        layer(x_all)
        layer.aux_loss.backward()
        torch.testing.assert_close(layer.aux_loss, ref.aux_loss, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.router.weight.grad, ref.router.weight.grad)
        use_local_aux_loss(layer)
        assert layer.router.aux_reduce is None
    finally:
        dist.destroy_process_group()
