"""Equivalence cases: ExpertParallel vs the single-device MoELayer (run inside gloo ranks)."""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field

import torch

from moeflow import MoEConfig, MoELayer

ROUTER_CFGS = {
    "softmax_topk": dict(router="softmax_topk", top_k=2, aux_loss_coef=0.01, z_loss_coef=1e-3),
    "switch": dict(router="switch", top_k=1, aux_loss_coef=0.01),
    "sigmoid": dict(router="sigmoid", top_k=2),
    "xmoe": dict(router="xmoe", top_k=2, xmoe_dim=8),
    "expert_choice": dict(router="expert_choice", top_k=2),
    "deepseek": dict(
        router="deepseek",
        top_k=2,
        n_group=4,
        topk_group=2,
        score_func="sigmoid",
        correction_bias=True,
        routed_scaling_factor=2.0,
        num_shared_experts=1,
        shared_ffn_hidden_size=16,
    ),
}


@dataclass
class Case:
    router: str = "softmax_topk"
    dispatcher: str = "a2a"
    esp: int = 1
    r_fwd: int = 1
    r_bwd: int = 1
    tokens: tuple = ()  # per rank; () = 12 each
    ranks_per_node: int = 0  # 0 = world size (one node)
    capacity_factor: object = None
    one_expert: bool = False  # router bias forces every token to expert 0 (or 0 and 1)
    experts: int = 8
    expert_type: str = "swiglu"
    extra: dict = field(default_factory=dict)

    def __str__(self):
        return (
            f"{self.router}/{self.dispatcher}/esp{self.esp}/r{self.r_fwd},{self.r_bwd}/"
            f"T{self.tokens}/rpn{self.ranks_per_node}/cf{self.capacity_factor}/"
            f"one{self.one_expert}/{self.expert_type}"
        )


def build(case: Case) -> tuple[MoELayer, MoEConfig]:
    kw = dict(ROUTER_CFGS[case.router])
    kw.update(case.extra)
    if case.one_expert:
        kw["router_bias"] = True
    cfg = MoEConfig(
        hidden_size=16,
        ffn_hidden_size=32,
        num_experts=case.experts,
        capacity_factor=case.capacity_factor,
        expert_type=case.expert_type,
        num_shared_experts=kw.pop("num_shared_experts", 1 if case.router == "softmax_topk" else 0),
        **kw,
    )
    torch.manual_seed(1234)
    layer = MoELayer(cfg)
    if case.one_expert:
        with torch.no_grad():
            layer.router.bias.zero_()
            layer.router.bias[0] = 50.0
            if cfg.top_k > 1:
                layer.router.bias[1] = 40.0
    if case.router == "deepseek":
        with torch.no_grad():
            layer.router.correction_bias.copy_(torch.linspace(-0.1, 0.1, cfg.num_experts))
    return layer, cfg


def _ws(layer, ep):
    """Reference weights/grads sliced like this rank's local experts."""
    from moeflow.parallel.expert_parallel import slice_w_in

    e0, e1 = ep.expert_range
    f0, f1 = ep.ffn_slice
    swiglu = ep.cfg.expert_type == "swiglu"

    def sl(w_in, w_out):
        return (slice_w_in(w_in, e0, e1, ep.esp_rank, ep.esp_size, swiglu), w_out[e0:e1, :, f0:f1])

    return sl


def run_case(rank: int, world: int, case: Case, group=None) -> float:
    """Run one case on this rank; return the max relative error (raises on mismatch)."""
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    layer, cfg = build(case)
    tokens = case.tokens or (12,) * world
    offs = [0, *itertools.accumulate(tokens)]
    torch.manual_seed(99)
    x_all = torch.randn(offs[-1], cfg.hidden_size)
    g_all = torch.randn(offs[-1], cfg.hidden_size)

    # single-device reference: the layer on each rank's batch (per-batch routing semantics)
    ref = copy.deepcopy(layer)
    xr = x_all.clone().requires_grad_(True)
    loss = 0.0
    ys = []
    for r in range(world):
        xs = xr[offs[r] : offs[r + 1]]
        y = ref(xs)
        ys.append(y)
        loss = loss + (y * g_all[offs[r] : offs[r + 1]]).sum() + ref.aux_loss
    loss.backward()
    y_ref = torch.cat(ys)

    ep = ExpertParallel(
        copy.deepcopy(layer),
        group=group,
        topology=Topology.explicit(world, case.ranks_per_node or world),
        dispatcher=case.dispatcher,
        esp_size=case.esp,
        r_fwd=case.r_fwd,
        r_bwd=case.r_bwd,
        timeout_s=30,
    )
    # an alias ("2dh") builds the dispatcher registered under its role name
    assert ep.dispatcher_name == ep.dispatcher.name
    assert ep.dispatcher_name == {"2dh": "hierarchical"}.get(case.dispatcher, case.dispatcher)
    x = x_all[offs[rank] : offs[rank + 1]].clone().requires_grad_(True)
    y = ep(x)
    loss = (y * g_all[offs[rank] : offs[rank + 1]]).sum() + ep.aux_loss
    loss.backward()
    ep.sync_gradients("sum")

    checks = [
        ("output", y, y_ref[offs[rank] : offs[rank + 1]]),
        ("grad x", x.grad, xr.grad[offs[rank] : offs[rank + 1]]),
    ]
    sl = _ws(ref, ep)
    gi, go = sl(ref.experts.w_in.grad, ref.experts.w_out.grad)
    checks += [("grad w_in", ep.w_in.grad, gi), ("grad w_out", ep.w_out.grad, go)]
    ref_params = dict(ref.named_parameters())
    for name, p in ep.named_parameters():
        if name in ("w_in", "w_out"):
            continue
        rp = ref_params[name]
        if rp.grad is None and p.grad is None:
            continue
        checks.append(
            (
                f"grad {name}",
                p.grad if p.grad is not None else torch.zeros_like(p),
                rp.grad if rp.grad is not None else torch.zeros_like(rp),
            )
        )
    worst = 0.0
    for what, got, want in checks:
        assert got is not None, f"{case}: {what} missing"
        assert got.shape == want.shape, f"{case}: {what} shape {got.shape} vs {want.shape}"
        if got.numel() == 0:
            continue
        scale = want.abs().max().item() + 1e-6
        err = (got - want).abs().max().item() / scale
        worst = max(worst, err)
        if err > 2e-5:
            raise AssertionError(f"rank {rank} case {case}: {what} differs, rel err {err:.3g}")
    return worst


def run_cases(rank: int, world: int, cases: list) -> list:
    return [run_case(rank, world, c) for c in cases]
