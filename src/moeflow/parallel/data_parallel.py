"""Gradient synchronisation and clipping for a model whose MoE layers are ExpertParallel.

Non-expert parameters (attention, embeddings, routers, shared experts) are replicated on
every rank: their gradients are all-reduced in flat buckets
(:func:`moeflow.comm.collectives.reduce_gradients`, which ``ExpertParallel.sync_gradients``
uses too). Expert slices are unique to
their rank and their gradients already sum every rank's tokens (the a2a adjoint), so they
are only scaled. With ``op="mean"`` the result is the gradient of the mean of the ranks'
local losses: for equal local batches, the single-process gradient of the global batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from moeflow.comm.collectives import DEFAULT_BUCKET_BYTES, all_reduce, reduce_gradients
from moeflow.comm.timeouts import resolve_timeout


def expert_parameter_ids(model: nn.Module) -> set[int]:
    from moeflow.parallel.expert_parallel import ExpertParallel

    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, ExpertParallel):
            ids.update(id(p) for p in m.expert_parameters())
    return ids


@torch.no_grad()
def sync_gradients(
    model: nn.Module,
    group=None,
    op: str = "mean",
    timeout_s=None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """All-reduce replicated gradients over ``group``; scale everything for ``op='mean'``."""
    experts = expert_parameter_ids(model)
    params = list(model.parameters())
    replicated = [p for p in params if p.requires_grad and id(p) not in experts]
    reduce_gradients(
        params,
        replicated,
        group,
        op=op,
        timeout_s=resolve_timeout(timeout_s),
        bucket_bytes=bucket_bytes,
    )


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
