"""Routers: token -> expert assignments, plus the auxiliary losses.

Shape legend: T tokens, D hidden, E experts, K top-k, N assignments (token, expert pairs),
C per-expert capacity.

Every router is an ``nn.Module`` with one method that matters, ``forward(x_TD) -> Routing``.
A :class:`Routing` is a flat list of assignments sorted by expert (stable, so tokens keep their
order inside an expert), with per-expert counts.

Two families share the gate (:class:`Router`): token-choice routers (:class:`TopKRouter`) pick
``(T, K)`` indices and weights in ``select`` and turn them into a Routing through
:func:`assignments_from_topk`, which also applies the capacity (drop mode); expert choice
(:class:`ExpertChoiceRouter`) picks per expert and builds the Routing directly, so it has no
``select``.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeflow.config import MoEConfig
from moeflow.errors import RoutingError
from moeflow.kernels.grouped import compute_dtype


@dataclass
class Routing:
    """Assignments of tokens to experts, sorted by expert.

    Attributes:
        token_idx_N: token of each assignment (long).
        expert_idx_N: expert of each assignment (long), non-decreasing.
        weight_N: combine weight of each assignment (differentiable).
        counts_E: assignments per expert (long).
        aux_loss: 0-d tensor, the weighted sum of the enabled auxiliary losses.
        logits_TE: raw router logits (for diagnostics and losses).
        num_dropped: assignments dropped by the capacity limit.
    """

    token_idx_N: torch.Tensor
    expert_idx_N: torch.Tensor
    weight_N: torch.Tensor
    counts_E: torch.Tensor
    aux_loss: torch.Tensor
    logits_TE: torch.Tensor
    num_dropped: int = 0


def capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Per-expert capacity ``ceil(f * k * T / E)`` (FSMoE: ``k·f·B·L/E``)."""
    return int(math.ceil(capacity_factor * top_k * num_tokens / num_experts))


def check_finite(logits_TE: torch.Tensor) -> None:
    """Raise :class:`RoutingError` when any router logit is NaN or Inf.

    Eager mode reads the flag on the host. Under ``torch.compile`` / ``torch.export`` that read
    is a data-dependent branch, so the check becomes an asynchronous assert in the graph instead
    (a RuntimeError from the runtime, not a RoutingError).
    """
    if torch.compiler.is_compiling():
        torch._assert_async(
            torch.isfinite(logits_TE).all(), "router logits are not finite (NaN or Inf)"
        )
        return
    if not bool(torch.isfinite(logits_TE).all()):
        bad = int((~torch.isfinite(logits_TE)).any(dim=-1).sum())
        raise RoutingError(
            f"router logits are not finite for {bad} of {logits_TE.shape[0]} tokens "
            "(NaN or Inf); check the input activations and the router weights"
        )


def assignments_from_topk(
    topk_idx_TK: torch.Tensor,
    topk_weight_TK: torch.Tensor,
    num_experts: int,
    capacity_factor: float | None,
):
    """Flatten (T, K) choices into expert-sorted assignments, dropping over capacity.

    Drop priority follows GShard: every token's first choice is served before any token's
    second choice, and within one choice rank earlier tokens win.

    Returns (token_idx_N, expert_idx_N, weight_N, counts_E, num_dropped).
    """
    T, K = topk_idx_TK.shape
    device = topk_idx_TK.device
    # k-major order: (k=0, all tokens), (k=1, all tokens), ...
    expert_flat = topk_idx_TK.t().reshape(-1)
    token_flat = torch.arange(T, device=device).repeat(K)
    weight_flat = topk_weight_TK.t().reshape(-1)
    num_dropped = 0
    if capacity_factor is not None and T > 0:
        cap = capacity(T, K, num_experts, capacity_factor)
        one_hot = F.one_hot(expert_flat, num_experts)
        position = (torch.cumsum(one_hot, 0) - 1).gather(1, expert_flat[:, None])[:, 0]
        keep = position < cap
        num_dropped = int((~keep).sum())
        if num_dropped:
            expert_flat, token_flat, weight_flat = (
                expert_flat[keep],
                token_flat[keep],
                weight_flat[keep],
            )
    # Sort by (expert, token): key = expert * T + token keeps token order within an expert.
    order = torch.argsort(expert_flat * max(T, 1) + token_flat)
    expert_idx_N = expert_flat[order]
    token_idx_N = token_flat[order]
    weight_N = weight_flat[order]
    counts_E = torch.bincount(expert_idx_N, minlength=num_experts)
    return token_idx_N, expert_idx_N, weight_N, counts_E, num_dropped


def load_balancing_loss(
    probs_TE: torch.Tensor, topk_idx_TK: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """Switch/GShard load balancing: ``E * sum_e f_e * P_e``.

    ``f_e`` is the fraction of (token, choice) slots routed to expert e, ``P_e`` the mean router
    probability of e. Equals 1 under perfect balance.
    """
    if probs_TE.shape[0] == 0:
        return probs_TE.new_zeros(())
    counts = torch.bincount(topk_idx_TK.reshape(-1), minlength=num_experts).to(probs_TE.dtype)
    f_E = counts / topk_idx_TK.numel()
    p_E = probs_TE.mean(0)
    return num_experts * torch.sum(f_E * p_E)


def global_aux_loss(
    logits_TE: torch.Tensor,
    probs_TE: torch.Tensor | None,
    topk_idx_TK: torch.Tensor | None,
    num_experts: int,
    lb_coef: float,
    z_coef: float,
    reduce,
) -> torch.Tensor:
    """``lb_coef * load_balancing + z_coef * z_loss`` over the *global* batch: the value the
    single-device router gets on the concatenation of every rank's tokens.

    The load-balancing loss of Switch (Fedus et al., JMLR'22, Eq. 4-6) / GShard is
    ``E * sum_e f_e P_e`` with ``f`` the fraction of routed slots and ``P`` the mean router
    probability; the ST-MoE z-loss a mean over tokens. All are ratios of sums over tokens, so
    the global values come from summed statistics: the routed counts, the slots, the
    probability sums, the token count and the z sums, all-reduced in one vector by
    ``reduce`` (Megatron-LM's global-batch aux loss all-reduces the expert loads the same
    way). ``reduce(stats) -> summed stats`` must be differentiable, with the gradient of the
    sum over ranks (its backward an all-reduce of the gradients): then the probability sums,
    the only differentiable statistics, get every rank's share of the gradient.
    ``probs_TE`` / ``topk_idx_TK`` None: the load-balancing part is absent (expert choice).
    """
    E = num_experts
    dev = logits_TE.device
    stats = []
    if probs_TE is not None and lb_coef > 0:
        counts = torch.bincount(topk_idx_TK.reshape(-1), minlength=E).to(torch.float64)
        slots = torch.tensor([float(topk_idx_TK.numel())], dtype=torch.float64, device=dev)
        stats += [counts, slots, probs_TE.to(torch.float64).sum(0)]
    tokens = torch.tensor([float(logits_TE.shape[0])], dtype=torch.float64, device=dev)
    stats.append(tokens)
    if z_coef > 0:
        lse = torch.logsumexp(logits_TE.float(), dim=-1).to(torch.float64)
        stats.append(lse.square().sum().reshape(1))
    g = reduce(torch.cat(stats))
    aux = g.new_zeros(())
    i = 0
    if probs_TE is not None and lb_coef > 0:
        counts, slots, psum = g[:E], g[E], g[E + 1 : 2 * E + 1]
        T = g[2 * E + 1]
        f_E = counts / slots.clamp_min(1.0)
        aux = aux + lb_coef * E * torch.sum(f_E * psum) / T.clamp_min(1.0)
        i = 2 * E + 1
    T = g[i]
    if z_coef > 0:
        aux = aux + z_coef * g[i + 1] / T.clamp_min(1.0)
    return aux.to(logits_TE.dtype)


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """Router z-loss (ST-MoE): mean over tokens of ``logsumexp(logits)^2``."""
    if logits_TE.shape[0] == 0:
        return logits_TE.new_zeros(())
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


class Router(nn.Module, abc.ABC):
    """Base class: a linear gate ``logits = x W^T (+ b)``; ``forward(x_TD) -> Routing``."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.num_experts = cfg.num_experts
        self.top_k = cfg.top_k
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.bias = nn.Parameter(torch.zeros(cfg.num_experts)) if cfg.router_bias else None
        # None: aux losses on this batch; else a differentiable sum over ranks of the
        # statistics of :func:`global_aux_loss` (set by moeflow.parallel.aux_loss)
        self.aux_reduce = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.cfg.hidden_size**-0.5)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        """Router logits, returned in fp32.

        With ``router_dtype="float32"`` the GEMM itself runs in fp32, so routing decisions do
        not depend on the activation dtype; ``"input"`` runs it in the activation dtype (as
        transformers' Mixtral/Qwen routers) and only upcasts the result.
        """
        if self.cfg.router_dtype == "input":
            # A bf16 GEMM is an fp32-accumulated product rounded to bf16. On CPUs without native
            # bf16 dot products compute_dtype is fp32, which gives that result much faster.
            cd = compute_dtype(x_TD)
            w = self.weight.to(x_TD.dtype).to(cd)
            b = None if self.bias is None else self.bias.to(x_TD.dtype).to(cd)
            logits_TE = F.linear(x_TD.to(cd), w, b).to(x_TD.dtype).float()
        else:
            b = None if self.bias is None else self.bias.float()
            logits_TE = F.linear(x_TD.float(), self.weight.float(), b)
        check_finite(logits_TE)
        return logits_TE

    @abc.abstractmethod
    def forward(self, x_TD: torch.Tensor) -> Routing:
        """Route ``x_TD``: the expert-sorted assignments, counts and auxiliary loss."""

    def _global_aux(self, logits_TE, probs_TE, topk_idx_TK) -> torch.Tensor:
        lb = self.cfg.aux_loss_coef if probs_TE is not None else 0.0
        return global_aux_loss(
            logits_TE,
            probs_TE,
            topk_idx_TK,
            self.num_experts,
            lb,
            self.cfg.z_loss_coef,
            self.aux_reduce,
        )

    def global_aux_active(self) -> bool:
        """Whether this router's aux loss is the global one (a collective per forward)."""
        lb = self.cfg.aux_loss_coef > 0 and isinstance(self, TopKRouter)
        reduce = getattr(self, "aux_reduce", None)  # routers pickled before it existed
        return reduce is not None and (lb or self.cfg.z_loss_coef > 0)

    def empty_aux(self, x_TD: torch.Tensor) -> torch.Tensor:
        """The aux loss of a rank with no tokens: zero, or under a global aux loss this rank's
        part of the collective (zero statistics, still attached to the router's parameters
        so that its backward runs with every other rank's)."""
        if not self.global_aux_active():
            return x_TD.new_zeros(()) + 0.0 * x_TD.sum()
        E = self.num_experts
        anchor = sum(p.sum() for p in self.parameters()) * 0.0 + 0.0 * x_TD.sum()
        logits_TE = x_TD.new_zeros(0, E, dtype=torch.float32) + anchor.float()
        probs_TE = logits_TE if isinstance(self, TopKRouter) else None
        idx_TK = torch.zeros(0, self.top_k, dtype=torch.long, device=x_TD.device)
        return self._global_aux(logits_TE, probs_TE, idx_TK) + anchor


class TopKRouter(Router):
    """Token choice: each token picks experts in :meth:`select`; capacity and losses here.

    The auxiliary loss is the Switch/GShard load-balancing loss (``aux_loss_coef``) plus the
    router z-loss (``z_loss_coef``); over-capacity choices are dropped GShard-style.
    """

    def _aux(self, logits_TE, probs_TE, topk_idx_TK) -> torch.Tensor:
        if self.global_aux_active():
            return self._global_aux(logits_TE, probs_TE, topk_idx_TK)
        aux = logits_TE.new_zeros(())
        if self.cfg.aux_loss_coef > 0:
            aux = aux + self.cfg.aux_loss_coef * load_balancing_loss(
                probs_TE, topk_idx_TK, self.num_experts
            )
        if self.cfg.z_loss_coef > 0:
            aux = aux + self.cfg.z_loss_coef * z_loss(logits_TE)
        return aux

    def _finish(
        self, x_TD, logits_TE, probs_TE, topk_idx_TK, topk_w_TK, capacity_factor: float | None
    ) -> Routing:
        tok, exp, w, counts, dropped = assignments_from_topk(
            topk_idx_TK, topk_w_TK.to(x_TD.dtype), self.num_experts, capacity_factor
        )
        return Routing(
            tok, exp, w, counts, self._aux(logits_TE, probs_TE, topk_idx_TK), logits_TE, dropped
        )

    @abc.abstractmethod
    def select(self, x_TD: torch.Tensor):
        """Return (logits_TE, probs_TE, topk_idx_TK, topk_weight_TK) for a top-k router."""

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE, probs_TE, idx_TK, w_TK = self.select(x_TD)
        return self._finish(x_TD, logits_TE, probs_TE, idx_TK, w_TK, self.cfg.capacity_factor)


class SoftmaxTopKRouter(TopKRouter):
    """GShard / Mixtral / Qwen3 softmax top-k.

    GShard noisy gating (training only): ``H = x W_g + N(0,1) * softplus(x W_noise)``; then
    ``softmax`` and ``KeepTopK``. With ``norm_topk_prob`` the kept probabilities are renormalised
    to sum to 1, which equals GShard's ``softmax(KeepTopK(H, k))``.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.noise_weight = (
            nn.Parameter(torch.zeros(cfg.num_experts, cfg.hidden_size))
            if cfg.noisy_gating
            else None
        )

    def select(self, x_TD):
        logits_TE = self.logits(x_TD)
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(x_TD.float(), self.noise_weight.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std
        probs_TE = torch.softmax(logits_TE, dim=-1)
        w_TK, idx_TK = torch.topk(probs_TE, self.top_k, dim=-1)
        if self.cfg.norm_topk_prob:
            w_TK = w_TK / w_TK.sum(dim=-1, keepdim=True)
        return logits_TE, probs_TE, idx_TK, w_TK


class SwitchRouter(TopKRouter):
    """Switch Transformer top-1: the weight is the chosen expert's softmax probability.

    Usually paired with a ``capacity_factor``; tokens over capacity are dropped.
    """

    def select(self, x_TD):
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        w_TK, idx_TK = torch.max(probs_TE, dim=-1, keepdim=True)
        return logits_TE, probs_TE, idx_TK, w_TK


class SigmoidRouter(TopKRouter):
    """Top-k by logit; each expert output is scaled by ``sigmoid(logit)`` (BASE/StableMoE)."""

    def select(self, x_TD):
        logits_TE = self.logits(x_TD)
        top_logits_TK, idx_TK = torch.topk(logits_TE, self.top_k, dim=-1)
        probs_TE = torch.softmax(logits_TE, dim=-1)  # only for the balancing loss
        return logits_TE, probs_TE, idx_TK, torch.sigmoid(top_logits_TK)


class XMoERouter(SoftmaxTopKRouter):
    """X-MoE cosine routing: ``s_e = cos(P x, e_e) / tau`` in a ``xmoe_dim`` space.

    ``self.weight`` is unused by the score; the projection ``proj`` (d, D) and the expert
    embeddings ``expert_emb`` (E, d) are the parameters, and ``tau`` is learned in log space
    (initial 0.07, as the X-MoE paper). Selection (softmax, top-k, optional renormalisation and
    noisy gating) is the softmax top-k router's, on these logits.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        del self.weight
        self.proj = nn.Parameter(torch.empty(cfg.xmoe_dim, cfg.hidden_size))
        self.expert_emb = nn.Parameter(torch.empty(cfg.num_experts, cfg.xmoe_dim))
        self.log_tau = nn.Parameter(torch.tensor(math.log(0.07)))
        nn.init.normal_(self.proj, std=cfg.hidden_size**-0.5)
        nn.init.orthogonal_(self.expert_emb, gain=0.32)

    def reset_parameters(self) -> None:  # weight is replaced in __init__
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def logits(self, x_TD):
        z_Td = F.normalize(F.linear(x_TD.float(), self.proj.float()), dim=-1)
        e_Ed = F.normalize(self.expert_emb.float(), dim=-1)
        logits_TE = (z_Td @ e_Ed.t()) / self.log_tau.exp()
        check_finite(logits_TE)
        return logits_TE


class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): each expert picks its top-C tokens.

    ``S = softmax(x W_g)`` over experts; each expert takes the C tokens with the highest score,
    ``C = ceil(f * T * K / E)`` with ``f = capacity_factor or 1`` (so on average each token
    reaches K experts). The combine weight is ``S[t, e]``. A token may reach zero or many experts.

    It is not a :class:`TopKRouter`: there is no per-token selection to override, and the
    token-choice load-balancing loss does not apply (every expert takes exactly C tokens), so
    its auxiliary loss is the z-loss alone.
    """

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = self.logits(x_TD)
        T, E = logits_TE.shape
        probs_TE = torch.softmax(logits_TE, dim=-1)
        cap = min(T, capacity(T, self.top_k, E, self.cfg.capacity_factor or 1.0))
        w_EC, tok_EC = torch.topk(probs_TE.t(), cap, dim=-1)
        # Within an expert keep token order, matching the sorted layout of other routers.
        tok_EC, order = torch.sort(tok_EC, dim=-1)
        w_EC = torch.gather(w_EC, 1, order)
        token_idx_N = tok_EC.reshape(-1)
        expert_idx_N = torch.arange(E, device=x_TD.device).repeat_interleave(cap)
        counts_E = torch.full((E,), cap, dtype=torch.long, device=x_TD.device)
        aux = logits_TE.new_zeros(())
        if self.cfg.z_loss_coef > 0:
            if self.global_aux_active():
                aux = self._global_aux(logits_TE, None, None)
            else:
                aux = aux + self.cfg.z_loss_coef * z_loss(logits_TE)
        return Routing(
            token_idx_N, expert_idx_N, w_EC.reshape(-1).to(x_TD.dtype), counts_E, aux, logits_TE, 0
        )


class DeepSeekRouter(TopKRouter):
    """DeepSeek V2/V3 group-limited top-k.

    1. scores = softmax(logits) (V2) or sigmoid(logits) (V3).
    2. Choice scores add the aux-loss-free correction bias (V3, buffer ``correction_bias``).
    3. Experts form ``n_group`` groups; a group's score is its max (softmax, V2) or the sum of its
       top two choice scores (sigmoid, V3). Only the ``topk_group`` best groups stay eligible.
    4. Top-k among eligible experts by choice score; weights are the unbiased scores,
       renormalised if ``norm_topk_prob``, times ``routed_scaling_factor``.

    The bias gets no gradient: :meth:`update_correction_bias` nudges it after each step by
    ``rate * sign(mean_load - load_e)`` (DeepSeek-V3's auxiliary-loss-free balancing).
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__(cfg)
        self.register_buffer(
            "correction_bias", torch.zeros(cfg.num_experts), persistent=cfg.correction_bias
        )

    def select(self, x_TD):
        cfg = self.cfg
        logits_TE = self.logits(x_TD)
        T, E = logits_TE.shape
        if cfg.score_func == "sigmoid":
            scores_TE = torch.sigmoid(logits_TE)
        else:
            scores_TE = torch.softmax(logits_TE, dim=-1)
        choice_TE = scores_TE + self.correction_bias.float() if cfg.correction_bias else scores_TE
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:
            grouped = choice_TE.view(T, cfg.n_group, E // cfg.n_group)
            if cfg.score_func == "sigmoid":
                group_scores = grouped.topk(min(2, E // cfg.n_group), dim=-1)[0].sum(-1)
            else:
                group_scores = grouped.max(dim=-1).values
            group_idx = torch.topk(group_scores, cfg.topk_group, dim=-1)[1]
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool)
            group_mask.scatter_(1, group_idx, True)
            expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(T, E)
            choice_TE = choice_TE.masked_fill(~expert_mask, float("-inf"))
        idx_TK = torch.topk(choice_TE, self.top_k, dim=-1)[1]
        w_TK = scores_TE.gather(1, idx_TK)
        if cfg.norm_topk_prob:
            w_TK = w_TK / (w_TK.sum(dim=-1, keepdim=True) + 1e-20)
        w_TK = w_TK * cfg.routed_scaling_factor
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True) if T else scores_TE
        return logits_TE, probs_TE, idx_TK, w_TK

    @torch.no_grad()
    def update_correction_bias(self, counts_E: torch.Tensor, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower others."""
        load = counts_E.float()
        self.correction_bias += rate * torch.sign(load.mean() - load)


ROUTER_CLASSES = {
    "softmax_topk": SoftmaxTopKRouter,
    "switch": SwitchRouter,
    "sigmoid": SigmoidRouter,
    "xmoe": XMoERouter,
    "expert_choice": ExpertChoiceRouter,
    "deepseek": DeepSeekRouter,
}


def build_router(cfg: MoEConfig) -> Router:
    return ROUTER_CLASSES[cfg.router](cfg)
