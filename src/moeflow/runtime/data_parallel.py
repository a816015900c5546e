"""Gradient synchronisation and clipping for a model whose MoE layers are ExpertParallel.

Non-expert parameters (attention, embeddings, routers, shared experts) are replicated on
every rank: their gradients are all-reduced (one flat bucket). Expert slices are unique to
their rank and their gradients already sum every rank's tokens (the a2a adjoint), so they
are only scaled. With ``op="mean"`` the result is the gradient of the mean of the ranks'
local losses: for equal local batches, the single-process gradient of the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from moeflow.comm.collectives import all_reduce
from moeflow.comm.timeouts import resolve_timeout
from moeflow.errors import ConfigError


def expert_parameter_ids(model: nn.Module) -> set[int]:
    from moeflow.runtime.expert_parallel import ExpertParallel
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, ExpertParallel):
            ids.update(id(p) for p in m.expert_parameters())
    return ids


@torch.no_grad()
def sync_gradients(model: nn.Module, group=None, op: str = "mean", timeout_s=None) -> None:
    """All-reduce replicated gradients over ``group``; scale everything for ``op='mean'``."""
    import torch.distributed as dist
    if op not in ("mean", "sum"):
        raise ConfigError("op", op, "'mean' or 'sum'")
    timeout_s = resolve_timeout(timeout_s)
    W = dist.get_world_size(group)
    experts = expert_parameter_ids(model)
    replicated = [p for p in model.parameters() if p.requires_grad and id(p) not in experts]
    for p in replicated:  # same bucket layout on every rank, even for unused parameters
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if W > 1 and replicated:
        flat = torch.cat([p.grad.reshape(-1) for p in replicated])
        all_reduce(flat, group, "gradient all-reduce", timeout_s)
        off = 0
        for p in replicated:
            p.grad.copy_(flat[off:off + p.numel()].view_as(p))
            off += p.numel()
    if op == "mean" and W > 1:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(W)


@torch.no_grad()
def clip_grad_norm(model: nn.Module, max_norm: float, group=None, timeout_s=None) -> float:
    """Global-norm clipping when expert slices live on different ranks (after sync)."""
    timeout_s = resolve_timeout(timeout_s)
    experts = expert_parameter_ids(model)
    rep_sq = torch.zeros((), dtype=torch.float64)
    exp_sq = torch.zeros((), dtype=torch.float64)
    for p in model.parameters():
        if p.grad is None:
            continue
        sq = p.grad.detach().double().pow(2).sum().cpu()
        if id(p) in experts:
            exp_sq += sq
        else:
            rep_sq += sq
    import torch.distributed as dist
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dev = next(model.parameters()).device
        t = exp_sq.to(dev if dev.type != "cpu" else "cpu").reshape(1)
        all_reduce(t, group, "grad-norm all-reduce", timeout_s)
        exp_sq = t.cpu().reshape(())
    total = math.sqrt(float(rep_sq + exp_sq))
    coef = max_norm / (total + 1e-6)
    if coef < 1.0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(coef)
    return total
