"""The one gradient path for a model whose MoE layers are :class:`ExpertParallel`: a whole
:func:`moeflow.parallel.parallelize`-d model (it carries a ``moeflow_layout``) or a model
built by hand around ``ExpertParallel`` layers on one process group.

Non-expert (dense) parameters are replicated on every rank: their gradients are all-reduced in
flat buckets (:func:`moeflow.comm.collectives.reduce_gradients`, which
``ExpertParallel.sync_gradients`` uses too), or reduce-scattered by FSDP2 when
``parallelize(dense="fsdp")`` sharded them. Expert slices are unique to their expert group and
their gradients already sum that group's tokens (the all-to-all's adjoint), so they are only
summed over their data-parallel replicas and scaled. With ``op="mean"`` the result is the
gradient of the mean of the ranks' local losses: for equal local batches, the single-process
gradient of the global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from moeflow.comm.collectives import DEFAULT_BUCKET_BYTES, all_reduce, reduce_gradients
from moeflow.comm.timeouts import resolve_timeout
from moeflow.errors import ConfigError


def expert_parameter_ids(model: nn.Module) -> set[int]:
    from moeflow.parallel.expert_parallel import ExpertParallel

    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, ExpertParallel):
            ids.update(id(p) for p in m.expert_parameters())
    return ids


@dataclass
class _GradLayout:
    """Where each kind of gradient is reduced."""

    world: int
    dense_group: object  # replicas of the dense parameters
    dense: str  # "replicate" or "fsdp"
    expert_group: object  # ranks holding different expert shards
    expert_shards: int  # size of expert_group
    dp_group: object  # replicas of this rank's expert shard (None: no replicas)
    timeout_s: float


def _grad_layout(model: nn.Module, group, timeout_s) -> _GradLayout:
    layout = getattr(model, "moeflow_layout", None)
    if layout is not None:  # parallelize: the mesh decides, ``group`` must be the world
        if group is not None:
            raise ConfigError("group", group, "None for a parallelize()-d model (its mesh)")
        return _GradLayout(
            world=layout.world,
            dense_group=None,
            dense=getattr(layout, "dense", "replicate"),
            expert_group=layout.expert_group,
            expert_shards=layout.ep * layout.esp,
            dp_group=layout.dp_group,
            timeout_s=layout.timeout_s if timeout_s is None else resolve_timeout(timeout_s),
        )
    world = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
    return _GradLayout(world, group, "replicate", group, world, None, resolve_timeout(timeout_s))


@torch.no_grad()
def sync_gradients(
    model: nn.Module,
    group=None,
    op: str = "mean",
    timeout_s=None,
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
) -> None:
    """Gradients of the global loss after ``backward``.

    ``group``: the process group of a hand-built model's ``ExpertParallel`` layers (None: the
    default group); a :func:`parallelize`-d model uses its mesh and takes no group. Dense
    gradients are summed over their replicas (skipped under FSDP2, which reduce-scatters the
    average itself), expert-slice gradients over their data-parallel replicas, and with
    ``op="mean"`` everything is divided by the world size (DDP's convention)."""
    if op not in ("mean", "sum"):
        raise ConfigError("op", op, "'mean' or 'sum'")
    g = _grad_layout(model, group, timeout_s)
    experts = expert_parameter_ids(model)
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if id(p) not in experts]
    expert = [p for p in params if id(p) in experts]
    if g.dense == "fsdp":
        if op != "mean":
            raise ConfigError("op", op, "'mean' with dense='fsdp'")
    else:
        reduce_gradients(
            dense, dense, g.dense_group, op=op, timeout_s=g.timeout_s, bucket_bytes=bucket_bytes
        )
    if g.dp_group is not None:
        reduce_gradients(
            expert, expert, g.dp_group, op="sum", timeout_s=g.timeout_s, bucket_bytes=bucket_bytes
        )
    if op == "mean" and g.world > 1:
        for p in expert:
            if p.grad is not None:
                p.grad.div_(g.world)
    _scale_parm_layers(model)


def _scale_parm_layers(model: nn.Module) -> None:
    """Layers under a Parm schedule (INFOCOM'24): the S ranks of an MP group hold one batch
    and each of them carries 1/S of that batch's gradient of the layer's own parameters
    (router, shared and routed experts), while every other parameter gets the whole batch's
    on each of them. Scaling the layer's gradients by S makes every parameter's gradient the
    same reduction (sum or mean) over ranks, i.e. over the W/S distinct batches."""
    from moeflow.parallel.expert_parallel import ExpertParallel

    for m in model.modules():
        if isinstance(m, ExpertParallel) and m.mp_group is not None and m.esp_size > 1:
            for p in m.parameters():
                if p.grad is not None:
                    p.grad.mul_(m.esp_size)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, group=None, timeout_s=None) -> float:
    """Clip the gradients (after :func:`sync_gradients`) to a global 2-norm of ``max_norm``,
    as ``torch.nn.utils.clip_grad_norm_`` on the single-process model would; returns the
    norm before clipping.

    The squared norm is counted once per distinct tensor: dense gradients once (replicated:
    any rank's; FSDP2: the sum of the shards over the world), each expert shard once (summed
    over the expert group; data-parallel replicas hold the same values)."""
    g = _grad_layout(model, group, timeout_s)
    experts = expert_parameter_ids(model)
    grads = [(id(p) in experts, p.grad) for p in model.parameters() if p.grad is not None]
    sq = torch.zeros(2, dtype=torch.float64)  # [dense, expert]
    for is_expert, grad in grads:
        local = grad.to_local() if hasattr(grad, "to_local") else grad
        sq[int(is_expert)] += local.detach().double().pow(2).sum().cpu()
    dev = next(model.parameters()).device
    on = dev if dev.type != "cpu" else torch.device("cpu")
    if g.dense == "fsdp" and g.world > 1:
        dense_sq = sq[:1].clone().to(on)
        all_reduce(dense_sq, None, "grad-norm all-reduce (dense shards)", g.timeout_s)
        sq[0] = dense_sq.cpu()[0]
    if g.expert_shards > 1:
        expert_sq = sq[1:].clone().to(on)
        all_reduce(expert_sq, g.expert_group, "grad-norm all-reduce (expert shards)", g.timeout_s)
        sq[1] = expert_sq.cpu()[0]
    total = float(sq.sum().sqrt())
    coef = float(max_norm) / (total + 1e-6)
    if coef < 1.0:
        for _, grad in grads:
            grad.mul_(coef)
    return total


class MasterWeights:
    """Mixed-precision training with fp32 master weights (Micikevicius et al., "Mixed
    Precision Training", ICLR'18; the bf16 recipe of Megatron-LM and DeepSpeed): the model's
    floating parameters and buffers become ``dtype`` copies that run forward and backward,
    while fp32 masters, the optimizer and its state hold the weights that are updated.

        masters = MasterWeights(model, torch.bfloat16)
        opt = torch.optim.AdamW(masters.parameters(), lr=...)
        loss.backward(); sync_gradients(model); clip_grad_norm_(model, 1.0)
        masters.step(opt)          # fp32 grads -> fp32 step -> rounded into the model

    Parameters keep their identity (their ``.data`` changes dtype), so ExpertParallel's
    expert slices and the gradient helpers above still recognise them.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype = torch.bfloat16):
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError("dtype", dtype, "a floating torch dtype (torch.bfloat16)")
        self.dtype = dtype
        self.model_params = [p for p in model.parameters() if p.is_floating_point()]
        self.masters = []
        for p in self.model_params:
            m = nn.Parameter(p.detach().to(torch.float32).clone(), requires_grad=p.requires_grad)
            self.masters.append(m)
            p.data = p.data.to(dtype)
        for mod in model.modules():
            for name, b in mod._buffers.items():
                if b is not None and b.is_floating_point():
                    mod._buffers[name] = b.to(dtype)

    def parameters(self) -> list[nn.Parameter]:
        """The fp32 masters, in the model's parameter order (give these to the optimizer)."""
        return self.masters

    @torch.no_grad()
    def step(self, optimizer) -> None:
        """Masters' gradients := the model's (in fp32), ``optimizer.step()``, and the updated
        masters rounded into the model; the model's gradients are released."""
        for m, p in zip(self.masters, self.model_params):
            m.grad = None if p.grad is None else p.grad.to(torch.float32)
            p.grad = None
        optimizer.step()
        for m, p in zip(self.masters, self.model_params):
            p.data.copy_(m.data)
