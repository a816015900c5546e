"""MoELayer: route -> permute -> experts -> unpermute and combine (+ shared experts).

Shape legend: T tokens, D hidden, E experts, N assignments (grouped by expert).

The whole single-device pipeline reads top to bottom in :meth:`MoELayer.forward`; each step is
also a public method so the expert-parallel runtime can run the same math with communication
between the steps (``route``, ``permute``, ``experts``, ``combine``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from moeflow.config import MoEConfig
from moeflow.errors import InputError
from moeflow.layer.experts import Experts, SharedExperts
from moeflow.layer.routers import Routing, build_router


class MoELayer(nn.Module):
    """A Mixture-of-Experts FFN layer. ``y = layer(x)`` for ``x`` of shape ``[..., D]``.

    After each forward, ``layer.aux_loss`` holds the weighted auxiliary loss (a 0-d tensor that
    is part of the autograd graph; add it to your loss) and ``layer.last_counts_E`` the tokens
    each expert received. Copies (``copy.deepcopy``, pickling, hence ``AveragedModel`` / EMA)
    carry a detached ``aux_loss``: a graph cannot be copied, and the copy has not run forward.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if not isinstance(cfg, MoEConfig):
            raise InputError(f"MoELayer expects a MoEConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.router = build_router(cfg)
        self.experts = Experts.from_config(cfg)
        self.shared = SharedExperts(cfg) if cfg.num_shared_experts > 0 else None
        self.aux_loss = torch.zeros(())
        self.last_counts_E = torch.zeros(cfg.num_experts, dtype=torch.long)

    def __getstate__(self):
        # deepcopy and pickle go through here; a graph-attached aux_loss cannot be deep-copied
        state = dict(super().__getstate__())
        aux = state.get("aux_loss")
        if isinstance(aux, torch.Tensor) and aux.requires_grad:
            state["aux_loss"] = aux.detach()
        return state

    # -- the steps -----------------------------------------------------------------------
    def check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(
                f"input dtype {x.dtype} is not allowed: a floating dtype "
                "(float32, bfloat16, float16)"
            )
        if x.dim() == 0 or x.shape[-1] != self.cfg.hidden_size:
            raise InputError(
                f"input shape {tuple(x.shape)} does not end in hidden_size={self.cfg.hidden_size}"
            )

    def route(self, x_TD: torch.Tensor) -> Routing:
        """Assignments sorted by expert, capacity applied (see :mod:`moeflow.layer.routers`)."""
        return self.router(x_TD)

    @staticmethod
    def permute(x_TD: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Copy each token once per assignment, grouped by expert: ``x_ND``."""
        return x_TD.index_select(0, routing.token_idx_N)

    @staticmethod
    def combine(y_ND: torch.Tensor, routing: Routing, num_tokens: int) -> torch.Tensor:
        """Unpermute and weight: ``y_TD[t] = sum over assignments of t of w * y_ND``."""
        weighted = y_ND * routing.weight_N.to(y_ND.dtype).unsqueeze(-1)
        out = y_ND.new_zeros(num_tokens, y_ND.shape[-1])
        return out.index_add(0, routing.token_idx_N, weighted)

    def combine_with_shared(
        self, y_ND: torch.Tensor, routing: Routing, x_TD: torch.Tensor
    ) -> torch.Tensor:
        """The layer's output rows: combined routed outputs plus the shared experts' output."""
        y_TD = self.combine(y_ND, routing, x_TD.shape[0])
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        return y_TD

    # -- the layer -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        T = x_TD.shape[0]
        if T == 0:
            self.aux_loss = x.new_zeros((), dtype=torch.float32)
            self.last_counts_E = torch.zeros(self.cfg.num_experts, dtype=torch.long)
            return x * 0
        routing = self.route(x_TD)
        x_ND = self.permute(x_TD, routing)
        y_ND = self.experts(x_ND, routing.counts_E)
        y_TD = self.combine_with_shared(y_ND, routing, x_TD)
        self.aux_loss = routing.aux_loss
        self.last_counts_E = routing.counts_E.detach()
        return y_TD.reshape(shape)

    def extra_repr(self) -> str:
        c = self.cfg
        return (
            f"router={c.router}, experts={c.num_experts}, top_k={c.top_k}, "
            f"capacity_factor={c.capacity_factor}, shared={c.num_shared_experts}"
        )
