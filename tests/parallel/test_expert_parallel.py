"""ExpertParallel equals the single-device MoELayer: outputs and every gradient (gloo ranks).

Each test spawns ONE group and loops over many cases inside it (spawning costs seconds).
Reference: the single-device layer run on each rank's batch with the same weights; the loss
is the sum over ranks (so gradients compare with ``sync_gradients("sum")``).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from tests._dist import run_ranks
from tests.parallel.ep_cases import ROUTER_CFGS, Case, run_cases

pytestmark = pytest.mark.dist
ROUTERS = list(ROUTER_CFGS)
R_PAIRS = list(itertools.product((1, 2, 4), repeat=2))  # r_fwd, r_bwd independently


def _world2_cases() -> list:
    cases = []
    # every dispatcher x degrees x ESP on/off, routers cycled through
    rot = itertools.cycle(ROUTERS)
    for d in ("a2a", "capacity", "hierarchical"):
        for esp in (1, 2):
            for rf, rb in [(1, 1), (2, 4), (4, 2), (4, 4)]:
                cases.append(
                    Case(
                        router=next(rot),
                        dispatcher=d,
                        esp=esp,
                        r_fwd=rf,
                        r_bwd=rb,
                        ranks_per_node=2 if esp == 2 else 1,
                        capacity_factor=1.25 if d == "capacity" else None,
                    )
                )
    # a rank with zero tokens, all tokens to one expert, drop mode
    cases += [
        Case(tokens=(0, 19), dispatcher="a2a", r_fwd=2, r_bwd=4),
        # capacity: every slot of the empty rank is padding (nothing to gather)
        Case(tokens=(0, 19), dispatcher="capacity", capacity_factor=1.25, r_fwd=2, r_bwd=4),
        Case(one_expert=True, dispatcher="capacity", r_fwd=4, r_bwd=1, tokens=(9, 14)),
        Case(
            router="switch",
            capacity_factor=0.5,
            dispatcher="a2a",
            r_fwd=2,
            r_bwd=2,
            tokens=(10, 21),
        ),
        Case(expert_type="gelu", dispatcher="hierarchical", ranks_per_node=1, r_fwd=4, r_bwd=2),
    ]
    return cases


def _world4_cases() -> list:
    cases = []
    # every dispatcher x ESP on/off x all 9 (r_fwd, r_bwd) in {1,2,4}^2, routers cycled
    rot = itertools.cycle([r for r in ROUTERS if r != "expert_choice"])
    for d in ("a2a", "capacity", "hierarchical"):
        for esp in (1, 2):
            for rf, rb in R_PAIRS:
                cases.append(
                    Case(
                        router=next(rot),
                        dispatcher=d,
                        esp=esp,
                        r_fwd=rf,
                        r_bwd=rb,
                        ranks_per_node=2,
                        tokens=(13, 6, 21, 10),
                        capacity_factor=1.0 if d == "capacity" else None,
                    )
                )
    # every router through the hierarchical (2DH) dispatcher with uneven token counts and a
    # rank with no tokens at all
    cases += [
        Case(
            router=r,
            dispatcher="hierarchical",
            ranks_per_node=2,
            r_fwd=2,
            r_bwd=4,
            tokens=(5, 17, 0, 9),
        )
        for r in ROUTERS
    ]
    # all tokens to experts 0 and 1 (rank 0's shard): ranks 1-3 receive zero rows
    cases += [
        Case(
            one_expert=True,
            tokens=(7, 0, 3, 20),
            dispatcher=d,
            esp=e,
            ranks_per_node=2,
            r_fwd=4,
            r_bwd=2,
        )
        for d in ("a2a", "hierarchical", "capacity")
        for e in (1, 2)
    ]
    # drop mode: per-rank capacity, as the single-device layer on each rank's batch
    cases += [
        Case(
            router="switch",
            capacity_factor=0.5,
            dispatcher=d,
            ranks_per_node=2,
            esp=e,
            r_fwd=2,
            r_bwd=4,
            tokens=(11, 20, 4, 13),
        )
        for d in ("a2a", "capacity", "hierarchical")
        for e in (1, 2)
    ]
    cases += [
        Case(
            router="softmax_topk",
            capacity_factor=0.75,
            dispatcher="capacity",
            ranks_per_node=2,
            r_fwd=4,
            r_bwd=4,
            tokens=(16, 16, 16, 16),
        )
    ]
    cases += [
        Case(
            expert_type="gelu", dispatcher="hierarchical", esp=2, ranks_per_node=4, r_fwd=4, r_bwd=1
        )
    ]
    # 2DH on other layouts: 4 nodes x 1 (no intra step), 1 node x 4 (no inter step), built
    # by the paper's name "2dh" (an alias of "hierarchical")
    cases += [
        Case(dispatcher="2dh", ranks_per_node=rpn, r_fwd=2, r_bwd=4, tokens=(3, 9, 0, 5))
        for rpn in (1, 4)
    ]
    return cases


def _config_errors(rank: int, world: int) -> list:
    """Configs that cannot work raise DistributedConfigError before any communication."""
    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.errors import DistributedConfigError
    from moeflow.parallel import ExpertParallel

    msgs = []
    bad = [
        (dict(num_experts=6), dict(topology=Topology.explicit(4, 2))),  # 6 % 4
        (dict(num_experts=8), dict(topology=Topology.explicit(4, 2), esp_size=4)),  # ESP > node
        (
            dict(num_experts=8, ffn_hidden_size=30),
            dict(topology=Topology.explicit(4, 4), esp_size=4),
        ),  # F % S
        (dict(num_experts=8), dict(topology=Topology.explicit(2, 1))),  # wrong size
    ]
    for cfg_kw, ep_kw in bad:
        cfg = MoEConfig(
            hidden_size=8, ffn_hidden_size=cfg_kw.pop("ffn_hidden_size", 16), top_k=2, **cfg_kw
        )
        try:
            ExpertParallel(MoELayer(cfg), **ep_kw)
        except DistributedConfigError as e:
            msgs.append(str(e))
        else:
            raise AssertionError(f"no DistributedConfigError for {cfg_kw} {ep_kw}")
    # the group is still in lock-step: nothing was half-sent
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    assert t.item() == sum(range(world))
    return msgs


def _world4_all(rank, world):
    return run_cases(rank, world, _world4_cases()), _config_errors(rank, world)


def test_ep_matches_single_device_world2():
    res = run_ranks(run_cases, 2, _world2_cases(), timeout_s=180)
    assert len(res) == 2 and all(len(r) == len(_world2_cases()) for r in res)
    assert max(max(r) for r in res) < 2e-5


def test_ep_matches_single_device_world4_and_config_errors():
    res = run_ranks(_world4_all, 4, timeout_s=240)
    errs, msgs = [r[0] for r in res], res[0][1]
    assert max(max(e) for e in errs) < 2e-5
    assert "num_experts=6" in msgs[0] and "esp_size=4" in msgs[1]
    assert "ffn_hidden_size=30" in msgs[2] and "world_size=2" in msgs[3]


def _full_grid() -> list:
    cases = []
    for d, esp, (rf, rb), router in itertools.product(
        ("a2a", "capacity", "hierarchical"), (1, 2), R_PAIRS, ROUTERS
    ):
        cases.append(
            Case(
                router=router,
                dispatcher=d,
                esp=esp,
                r_fwd=rf,
                r_bwd=rb,
                ranks_per_node=2,
                tokens=(13, 6, 21, 10),
                capacity_factor=1.0 if d == "capacity" and router != "expert_choice" else None,
            )
        )
    return cases


@pytest.mark.slow
def test_ep_full_grid_world4():
    res = run_ranks(run_cases, 4, _full_grid(), timeout_s=900)
    assert max(max(r) for r in res) < 2e-5


def _plan_and_degrees(rank, world):
    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel
    from moeflow.plan import LayerPlan, Plan

    cfg = MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2)
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    topo = Topology.explicit(world, world)
    plan = Plan(
        method="test",
        perf={},
        workload_table=[],
        layers=[LayerPlan(index=0, r_fwd=2, r_bwd=8), LayerPlan(index=1, r_fwd=4, r_bwd=1)],
    )
    a = ExpertParallel(layer, topology=topo, plan=plan, layer_index=1)
    b = ExpertParallel(layer, topology=topo, plan=(2, 4))
    c = ExpertParallel(layer, topology=topo, r_fwd=3, r_bwd=5)
    # the degrees can also change per call; the result must not
    x = torch.randn(10, 8)
    y1, y2 = c(x), c(x, r_fwd=1, r_bwd=1)
    # in eval (no_grad) nothing is kept for backward
    import moeflow.parallel.expert_parallel as m

    kept = {}
    orig = m._Run.forward

    def spy(self, *args):
        out = orig(self, *args)
        kept["v"] = (self.graphs, self.x_full)
        return out

    m._Run.forward = spy
    try:
        with torch.no_grad():
            b(x)
    finally:
        m._Run.forward = orig
    return (
        a.r_fwd,
        a.r_bwd,
        b.r_fwd,
        b.r_bwd,
        c.r_fwd,
        c.r_bwd,
        a.ep_size,
        a.num_local_experts,
        float((y1 - y2).abs().max()),
        kept["v"] == (None, None),
    )


def test_degrees_from_plan_ints_and_per_call():
    res = run_ranks(_plan_and_degrees, 2, timeout_s=60)
    assert res[0][:8] == (4, 1, 2, 4, 3, 5, 2, 2)
    assert res[0][8] < 1e-6 and res[0][9] is True


def _correction_bias(rank, world):
    """DeepSeek's aux-loss-free bias step uses the global expert loads on every rank."""
    import copy

    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    cfg = MoEConfig(
        hidden_size=8,
        ffn_hidden_size=16,
        num_experts=4,
        top_k=2,
        router="deepseek",
        score_func="sigmoid",
        correction_bias=True,
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    ref = copy.deepcopy(layer)
    torch.manual_seed(5)
    x_all = torch.randn(4 * world, 8)
    ep = ExpertParallel(layer, topology=Topology.explicit(world, world))
    ep(x_all[4 * rank : 4 * rank + 4])
    ep.update_correction_bias(rate=0.1)
    with torch.no_grad():
        ref(x_all)
    ref.router.update_correction_bias(ref.last_counts_E, rate=0.1)
    return (
        ep.router.correction_bias - ref.router.correction_bias
    ).abs().max().item(), ep.router.correction_bias.abs().sum().item()


def test_correction_bias_uses_global_loads():
    res = run_ranks(_correction_bias, 2, timeout_s=60)
    assert all(err == 0.0 for err, _ in res) and res[0][1] > 0


def _full_weights(rank, world):
    """full_expert_weights() reassembles exactly the single-device weights."""
    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    out = []
    for expert_type in ("swiglu", "gelu"):
        for esp in (1, 2):
            torch.manual_seed(3)
            layer = MoELayer(
                MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, expert_type=expert_type)
            )
            ep = ExpertParallel(layer, topology=Topology.explicit(world, 2), esp_size=esp)
            w_in, w_out = ep.full_expert_weights()
            out.append(
                torch.equal(w_in, layer.experts.w_in) and torch.equal(w_out, layer.experts.w_out)
            )
    return out


def test_full_expert_weights_roundtrip():
    res = run_ranks(_full_weights, 4, timeout_s=60)
    assert all(all(r) for r in res), res


def _on_subgroups(rank, world):
    """Two independent EP groups {0,1} and {2,3} (EP inside a data-parallel job)."""
    from moeflow.comm.groups import subgroup
    from tests.parallel.ep_cases import run_case

    g = subgroup(None, [0, 1] if rank < 2 else [2, 3])
    me = dist.get_rank(g)
    cases = [
        Case(
            dispatcher=d,
            esp=e,
            r_fwd=2,
            r_bwd=4,
            ranks_per_node=2,
            tokens=(7, 12),
            capacity_factor=1.0 if d == "capacity" else None,
        )
        for d in ("a2a", "capacity", "hierarchical")
        for e in (1, 2)
    ]
    return [run_case(me, 2, c, group=g) for c in cases]


def test_ep_on_explicit_subgroups():
    res = run_ranks(_on_subgroups, 4, timeout_s=120)
    assert all(len(r) == 6 and max(r) < 2e-5 for r in res)


def _expert_calls(rank, world):
    """Count the expert FFN's entry points per phase while equivalence cases run."""
    import moeflow.parallel.expert_parallel as m
    from moeflow.layer.experts import ExpertFFN
    from tests.parallel.ep_cases import run_case
    from tests.parallel.test_dedup import _equivalence

    phase = ["-"]
    calls: dict = {}

    def counted(cls, name):
        orig = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            calls[(phase[0], name)] = calls.get((phase[0], name), 0) + 1
            return orig(self, *args, **kwargs)

        setattr(cls, name, wrapper)

    for name in ("__call__", "forward_saving", "backward"):
        counted(ExpertFFN, name)
    for name in ("forward", "backward"):
        orig = getattr(m._Run, name)

        def in_phase(self, *args, orig=orig, name=name):
            phase[0] = name
            try:
                return orig(self, *args)
            finally:
                phase[0] = "-"

        setattr(m._Run, name, in_phase)

    out = []
    cases = [
        Case(dispatcher=d, esp=esp, r_fwd=rf, r_bwd=rb, ranks_per_node=2, tokens=(13, 6, 21, 10))
        for d in ("a2a", "capacity", "hierarchical")
        for esp in (1, 2)
        for rf, rb in ((2, 4), (4, 1))
    ]
    cases += [  # activations outside the fused kernel: the generic residual backward
        Case(expert_type="gelu", extra=dict(activation="relu"), r_fwd=3, r_bwd=2),
        Case(expert_type="swiglu", extra=dict(activation="gelu"), r_fwd=1, r_bwd=3, esp=2),
    ]
    for case in cases:
        if case.dispatcher == "capacity":
            case.capacity_factor = 1.0
        case.ranks_per_node = case.ranks_per_node or 2
        calls.clear()
        err = run_case(rank, world, case)
        out.append((str(case), err, dict(calls)))
    calls.clear()
    err, _ = _equivalence(
        rank, world, Case(router="softmax_topk", tokens=(13, 0, 21, 10), r_fwd=3, r_bwd=2), 1
    )
    out.append(("dedup r3,2", err, dict(calls)))
    return out


def test_no_expert_forward_is_recomputed_when_degrees_differ():
    """r_fwd != r_bwd: backward runs the hand-written expert backward on the residuals the
    forward chunks saved, and never the expert forward; outputs and gradients still equal
    the single-device layer (every dispatcher, ESP, dedup, activations outside the kernel)."""
    res = run_ranks(_expert_calls, 4, timeout_s=300)
    for per_rank in res:
        for name, err, calls in per_rank:
            assert err < 2e-5, name
            assert calls.get(("backward", "__call__"), 0) == 0, (name, calls)
            assert calls.get(("backward", "forward_saving"), 0) == 0, (name, calls)
            assert calls.get(("forward", "__call__"), 0) == 0, (name, calls)
    # the ranks that hold rows ran the residual forward and the hand-written backward
    for i in range(len(res[0])):
        assert sum(r[i][2].get(("forward", "forward_saving"), 0) for r in res) > 0
        assert sum(r[i][2].get(("backward", "backward"), 0) for r in res) > 0


def _custom_expert_fn(rank, world):
    """An ``expert_fn`` without a hand-written backward (the benchmark seam) still trains
    with r_fwd != r_bwd: its inputs are saved and its forward re-run per backward chunk."""
    import copy

    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.layer.experts import experts_eager

    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, ffn_hidden_size=16, num_experts=4, top_k=2))
    calls = []

    def plain(x, counts, w_in, w_out, activation, kernel):
        calls.append(x.shape[0])
        return experts_eager(x, counts, w_in, w_out, activation, True, kernel)

    grads = []
    for custom in (False, True):
        from moeflow.parallel import ExpertParallel

        ep = ExpertParallel(
            copy.deepcopy(layer), topology=Topology.explicit(world, world), r_fwd=2, r_bwd=3
        )
        if custom:
            ep.expert_fn = plain
        torch.manual_seed(1 + rank)
        x = torch.randn(11, 8, requires_grad=True)
        ep(x).square().sum().backward()
        grads.append((x.grad, ep.w_in.grad, ep.w_out.grad))
    errs = [float((a - b).abs().max()) for a, b in zip(*grads)]
    return errs, len(calls)


def test_custom_expert_fn_recomputes_and_matches():
    res = run_ranks(_custom_expert_fn, 2, timeout_s=60)
    for errs, n in res:
        assert max(errs) < 1e-5
        assert n > 2  # forward chunks, then the backward chunks' recompute


def _saved_bytes(rank, world):
    """Bytes a forward call keeps for backward: the chunks' graphs (equal degrees) or the
    canonical residual buffers (different degrees)."""
    import copy

    import moeflow.parallel.expert_parallel as m
    from moeflow import MoEConfig, MoELayer
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    runs = []
    orig = m._Run.forward

    def spy(self, *args):
        out = orig(self, *args)
        runs.append(self)
        return out

    def nbytes(tensors, weights):
        seen = {}
        skip = {w.untyped_storage().data_ptr() for w in weights}  # weights are not kept
        for t in tensors:
            if t is not None and t.untyped_storage().data_ptr() not in skip:
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

    m._Run.forward = spy
    out = []
    try:
        for expert_type in ("swiglu", "gelu"):
            torch.manual_seed(0)
            cfg = MoEConfig(
                hidden_size=16,
                ffn_hidden_size=32,
                num_experts=4,
                top_k=2,
                expert_type=expert_type,
            )
            layer = MoELayer(cfg)
            torch.manual_seed(1 + rank)
            x = torch.randn(40, 16)
            kept = []
            for rf, rb in ((4, 4), (4, 2)):
                ep = ExpertParallel(
                    copy.deepcopy(layer),
                    topology=Topology.explicit(world, world),
                    r_fwd=rf,
                    r_bwd=rb,
                )
                y = ep(x.clone().requires_grad_(True))
                run = runs[-1]
                if run.graphs is not None:
                    ts = []
                    for xc, yc in (g for g in run.graphs if g is not None):
                        ts += [xc, yc, *yc.grad_fn.saved_tensors]
                    kept.append(nbytes(ts, (run.w_in_d, run.w_out_d)))
                else:
                    assert run.x_full is None  # nothing to recompute from
                    kept.append(nbytes(run.saved + [run.y_full], (run.w_in_d, run.w_out_d)))
                y.sum().backward()
            out.append(kept)
    finally:
        m._Run.forward = orig
    return out


def test_residuals_for_other_degrees_keep_no_more_than_the_chunk_graphs():
    res = run_ranks(_saved_bytes, 2, timeout_s=60)
    for per_rank in res:
        for graphs, residuals in per_rank:
            assert 0.5 * graphs <= residuals <= graphs, (graphs, residuals)
