"""The load-balancing (and z-) loss over the global batch instead of each rank's own.

By default every rank's router computes its auxiliary losses on the tokens it routes, so an
expert-parallel or data-parallel run optimises the mean of per-rank losses: a different
objective from the single-device loss on the whole batch (the balance of a small local batch
is noisier, and the loss is nonlinear in the counts). The Switch / GShard load-balancing loss
``E * sum_e f_e P_e`` (Fedus et al., JMLR'22, Eq. 4-6; Lepikhin et al., ICLR'21) and the
ST-MoE z-loss are ratios of sums over tokens, so the global value follows from all-reducing
a few sums per layer (:func:`moeflow.layer.routers.global_aux_loss`), as Megatron-LM's
global-batch aux loss does with the expert loads.

Gradient: each rank adds the (same) global value to its loss and the optimiser step uses
the mean of the ranks' gradients (:func:`moeflow.parallel.sync_gradients`, ``op="mean"``).
The all-reduce of the statistics is differentiable with the exact adjoint (an all-reduce of
the gradients), so every rank's router gets the sum over ranks of ``d aux / d P`` for its own
probabilities, and the mean over ranks is the single-device gradient of the global loss.
Every rank must therefore backpropagate through the aux loss (add it to the loss on every
rank), as every rank already backpropagates through the expert-parallel layers.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moeflow.comm.collectives import all_reduce
from moeflow.comm.timeouts import resolve_timeout
from moeflow.errors import ConfigError
from moeflow.layer.routers import Router

AUX_LOSSES = ("local", "global")


def check_aux_loss(aux_loss: str, schedule: str | None = None) -> str:
    """``aux_loss`` checked (ConfigError): ``"local"`` or ``"global"``; the global loss is
    not defined with a Parm schedule, whose MP ranks route the same tokens."""
    if aux_loss not in AUX_LOSSES:
        raise ConfigError("aux_loss", aux_loss, f"one of {AUX_LOSSES}")
    if aux_loss == "global" and schedule is not None:
        raise ConfigError(
            "aux_loss",
            aux_loss,
            "'local' with a Parm schedule (its model-parallel ranks hold the same tokens, "
            f"schedule={schedule!r})",
        )
    return aux_loss


class _SumOverRanks(torch.autograd.Function):
    """``sum_r x_r`` on every rank; backward: the sum over ranks of the gradients (the
    adjoint of an all-reduce, since every rank's loss depends on every rank's ``x``)."""

    @staticmethod
    def forward(ctx, x, group, timeout_s):
        ctx.group, ctx.timeout_s = group, timeout_s
        return all_reduce(x.detach().clone(), group, "global aux-loss statistics", timeout_s)

    @staticmethod
    def backward(ctx, g):
        g = all_reduce(g.contiguous().clone(), ctx.group, "global aux-loss gradient", ctx.timeout_s)
        return g, None, None


class GlobalStatistics:
    """A router's ``aux_reduce``: the differentiable sum of a statistics vector over ``group``
    (None: the default group). Copies (``deepcopy``, EMA) share it: it holds no tensors."""

    def __init__(self, group=None, timeout_s: float | None = None):
        self.group = group
        self.timeout_s = resolve_timeout(timeout_s)

    def __call__(self, stats: torch.Tensor) -> torch.Tensor:
        return _SumOverRanks.apply(stats, self.group, self.timeout_s)

    def __deepcopy__(self, memo):
        return self


def use_global_aux_loss(model: nn.Module, group=None, timeout_s: float | None = None) -> int:
    """Make every router of ``model`` (a model, an ``ExpertParallel`` or a ``MoELayer``)
    compute its aux losses over the global batch of ``group`` (the ranks holding *distinct*
    tokens: the EP x DP world; None: the default group). Returns the routers changed.

    Collective per MoE forward (one small all-reduce per layer, and one in backward); a rank
    with no tokens takes part with zero statistics."""
    reducer = GlobalStatistics(group, timeout_s)
    n = 0
    for m in model.modules():
        if isinstance(m, Router):
            m.aux_reduce = reducer
            n += 1
    if n == 0:
        raise ConfigError("model", type(model).__name__, "a model with moeflow routers")
    return n


def use_local_aux_loss(model: nn.Module) -> None:
    """Undo :func:`use_global_aux_loss`: every router's aux losses on its own batch."""
    for m in model.modules():
        if isinstance(m, Router):
            m.aux_reduce = None
