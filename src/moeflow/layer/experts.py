"""Routed experts stored as 3-D weights, and shared experts.

Shape legend: N rows grouped by expert, D hidden, F FFN width, E experts, X = 2F (gated) or F.
Layout matches transformers 5.x so weights copy without reshaping:
``w_in`` is (E, 2F, D) for gated experts (gate rows, then up rows) or (E, F, D) for plain ones,
and ``w_out`` is (E, D, F).

Experts are gated, ``act(x W_gate) * (x W_up)`` (``expert_type="swiglu"``: SwiGLU with SiLU,
GeGLU with GELU; Shazeer, "GLU Variants Improve Transformer", 2020, Eq. 5-6), or plain,
``act(x W_in)`` (``expert_type="gelu"``). The activation is one of
:data:`moeflow.config.EXPERT_ACTIVATIONS`; the fused grouped kernel covers SiLU-gated and
tanh-GELU plain experts, the other combinations run a per-expert loop through autograd.
Under ``torch.compile`` the experts are the custom op ``moeflow::experts_ffn`` (same eager
code inside), under ``torch.export`` a gather-and-bmm graph of aten ops.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeflow.config import EXPERT_ACTIVATIONS, EXPERT_TYPES, MoEConfig
from moeflow.errors import ConfigError
from moeflow.kernels import expert_ffn, grouped
from moeflow.kernels.grouped import compute_dtype


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACT_FNS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": _gelu_tanh,
    "relu": F.relu,
}


def activation_fn(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The function for an activation name of :data:`EXPERT_ACTIVATIONS`."""
    try:
        return _ACT_FNS[name]
    except KeyError:
        raise ConfigError("activation", name, f"one of {EXPERT_ACTIVATIONS}") from None


def resolve_activation(expert_type: str, activation: str | None) -> str:
    """``activation``, or the expert type's default (SiLU gated, tanh-GELU plain)."""
    if expert_type not in EXPERT_TYPES:
        raise ConfigError("expert_type", expert_type, f"one of {EXPERT_TYPES}")
    if activation is None:
        return "silu" if expert_type == "swiglu" else "gelu_tanh"
    activation_fn(activation)  # validates
    return activation


def apply_activation(h_NX: torch.Tensor, activation: str, gated: bool) -> torch.Tensor:
    """``act(gate) * up`` over the two halves of ``h_NX`` (gated) or ``act(h_NX)``."""
    act = activation_fn(activation)
    if gated:
        gate, up = h_NX.chunk(2, dim=-1)
        return act(gate) * up
    return act(h_NX)


def _kernel_activation(gated: bool, activation: str) -> str | None:
    """The fused kernel's name for this expert kind, or None where it has none."""
    if gated and activation == "silu":
        return "swiglu"
    if not gated and activation == "gelu_tanh":
        return "gelu"
    return None


def _act_backward(grad: torch.Tensor, x: torch.Tensor, activation: str) -> torch.Tensor:
    """d act(x) / dx applied to ``grad``, without autograd."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, x)
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, x, 0)
    return torch.ops.aten.gelu_backward(
        grad, x, approximate="tanh" if activation == "gelu_tanh" else "none"
    )


def _experts_loop(x_ND, counts_E, w_in, w_out, activation: str, gated: bool) -> torch.Tensor:
    """One ``F.linear`` pair per non-empty expert (through autograd when it is on)."""
    cd = compute_dtype(x_ND)
    outs = [x_ND.new_zeros(0, w_out.shape[1], dtype=cd)]
    # unbind once: indexing w_in[e] per expert would make autograd build a full-size weight
    # gradient per expert
    w_in_E, w_out_E = w_in.unbind(0), w_out.unbind(0)
    for e, x_e in enumerate(x_ND.split(counts_E.tolist())):
        if x_e.shape[0]:
            h = F.linear(x_e.to(cd), w_in_E[e].to(cd))
            outs.append(F.linear(apply_activation(h, activation, gated), w_out_E[e].to(cd)))
    # the zero term keeps every weight in the graph (an all-empty batch gets zero grads)
    y_ND = torch.cat(outs) + 0 * (w_in.sum() + w_out.sum())
    return y_ND.to(x_ND.dtype)


def experts_eager(
    x_ND, counts_E, w_in, w_out, activation: str, gated: bool, kernel: str
) -> torch.Tensor:
    """The fused grouped kernel where it covers the activation, else the per-expert loop."""
    kernel_act = _kernel_activation(gated, activation)
    if kernel_act is None:
        return _experts_loop(x_ND, counts_E, w_in, w_out, activation, gated)
    return expert_ffn(x_ND, counts_E, w_in, w_out, kernel_act, kernel)


class ExpertFFN:
    """The grouped expert FFN of one ``(activation, gated)`` pair with two extra entry points
    for callers that split the backward into other row chunks than the forward (FSMoE,
    ASPLOS'25: separate pipeline degrees for forward and backward).

    ``ffn(x, counts, w_in, w_out)`` is :func:`experts_eager`. :meth:`forward_saving` also
    returns the residuals ``(x, h, a)`` (input in the compute dtype, pre-activation,
    activation), one row each per input row, so a caller may regroup rows freely;
    :meth:`backward` takes any rows of them (grouped by expert, ``counts``) with their output
    gradients and returns ``(grad x, grad w_in, grad w_out)`` with the grouped GEMMs and no
    autograd: the expert forward is never run again.
    """

    def __init__(self, activation: str, gated: bool, kernel: str = "auto"):
        activation_fn(activation)  # validates
        self.activation, self.gated, self.kernel = activation, gated, kernel
        fused = _kernel_activation(gated, activation)
        if fused is not None:  # the fused kernel's activation (SwiGLU backward in place)
            self._act, self._act_bwd = grouped.activation_pair(fused)
        else:
            self._act = lambda h: apply_activation(h, activation, gated)
            self._act_bwd = self._glu_backward if gated else self._plain_backward

    def _plain_backward(self, da, h):
        return _act_backward(da, h, self.activation)

    def _glu_backward(self, da, h):
        gate, up = h.chunk(2, dim=-1)
        s = activation_fn(self.activation)(gate)
        return torch.cat([_act_backward(da * up, gate, self.activation), da * s], dim=-1)

    def _impl(self, x: torch.Tensor) -> str:
        impl = grouped.resolve_impl("auto" if self.kernel == "loop" else self.kernel, x)
        return "bmm" if impl == "loop" else impl

    def __call__(self, x_ND, counts_E, w_in, w_out) -> torch.Tensor:
        return experts_eager(x_ND, counts_E, w_in, w_out, self.activation, self.gated, self.kernel)

    def forward_saving(self, x_ND, counts_E, w_in, w_out) -> tuple[torch.Tensor, tuple]:
        """``(y, (x, h, a))`` with no autograd graph (weights are read, not recorded)."""
        with torch.no_grad():
            y, saved, _ = grouped.ffn_forward_saving(
                x_ND, counts_E, w_in, w_out, self._act, self._impl(x_ND)
            )
        return y, saved

    def backward(self, gy_ND, saved, counts_E, w_in, w_out, out_dtype) -> tuple:
        """``(grad x, grad w_in, grad w_out)`` of the rows ``saved = (x, h, a)`` grouped by
        expert as ``counts_E``; ``out_dtype``: the dtype of the forward's input rows."""
        x_c, h, a = saved
        impl = self._impl(gy_ND)
        with torch.no_grad():
            return grouped.ffn_backward(
                grouped.groups_of(counts_E.to(x_c.device), x_c.shape[0], impl),
                gy_ND,
                x_c,
                h,
                a,
                w_in,
                w_out,
                self._act_bwd,
                x_c.dtype,
                (out_dtype, w_in.dtype, w_out.dtype),
                (True, True, True),
            )


# Under torch.compile the experts run as one opaque op: its eager body may branch on the
# counts (host syncs, per-expert loops) while the traced graph only sees the static output
# shape, so the compiled model keeps the eager kernel's speed.
@torch.library.custom_op("moeflow::experts_ffn", mutates_args=())
def experts_ffn_op(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    gated: bool,
    kernel: str,
) -> torch.Tensor:
    """:class:`Experts` forward as a custom op (graph-opaque for torch.compile)."""
    return experts_eager(x_ND, counts_E, w_in, w_out, activation, gated, kernel)


@experts_ffn_op.register_fake
def _(x_ND, counts_E, w_in, w_out, activation, gated, kernel):
    return x_ND.new_empty(x_ND.shape[0], w_out.shape[1])


@torch.library.custom_op("moeflow::experts_ffn_backward", mutates_args=())
def experts_ffn_backward_op(
    gy_ND: torch.Tensor,
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str,
    gated: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`experts_ffn_op` w.r.t. x, w_in and w_out, per expert by hand (an op
    body runs without autograd). ``h = x W_in^T`` is recomputed; then ``dW_out = dy^T a``,
    ``da = dy W_out``, ``dh = act'(h) da`` (GLU: ``[act'(g) (da u); da act(g)]``),
    ``dW_in = dh^T x`` and ``dx = dh W_in``."""
    cd = compute_dtype(x_ND)
    g_x = torch.zeros(x_ND.shape, dtype=cd, device=x_ND.device)
    g_in = torch.zeros(w_in.shape, dtype=cd, device=w_in.device)
    g_out = torch.zeros(w_out.shape, dtype=cd, device=w_out.device)
    act = activation_fn(activation)
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            x_e, gy = x_ND[start : start + n].to(cd), gy_ND[start : start + n].to(cd)
            w_i, w_o = w_in[e].to(cd), w_out[e].to(cd)
            h = x_e @ w_i.t()
            da = gy @ w_o
            if gated:
                gate, up = h.chunk(2, dim=-1)
                s = act(gate)
                a = s * up
                dh = torch.cat([_act_backward(da * up, gate, activation), da * s], dim=-1)
            else:
                a = act(h)
                dh = _act_backward(da, h, activation)
            g_out[e] = gy.t() @ a
            g_in[e] = dh.t() @ x_e
            g_x[start : start + n] = dh @ w_i
        start += n
    return g_x.to(x_ND.dtype), g_in.to(w_in.dtype), g_out.to(w_out.dtype)


@experts_ffn_backward_op.register_fake
def _(gy_ND, x_ND, counts_E, w_in, w_out, activation, gated):
    return torch.empty_like(x_ND), torch.empty_like(w_in), torch.empty_like(w_out)


def _experts_op_setup(ctx, inputs, output) -> None:
    x_ND, counts_E, w_in, w_out, activation, gated, _ = inputs
    ctx.save_for_backward(x_ND, counts_E, w_in, w_out)
    ctx.activation, ctx.gated = activation, gated


def _experts_op_backward(ctx, gy_ND):
    x_ND, counts_E, w_in, w_out = ctx.saved_tensors
    g_x, g_in, g_out = experts_ffn_backward_op(
        gy_ND.contiguous(), x_ND, counts_E, w_in, w_out, ctx.activation, ctx.gated
    )
    return g_x, None, g_in, g_out, None, None, None


experts_ffn_op.register_autograd(_experts_op_backward, setup_context=_experts_op_setup)


class Experts(nn.Module):
    """E independent FFN experts evaluated with one grouped kernel call."""

    def __init__(
        self,
        num_experts: int,
        hidden_size: int,
        ffn_hidden_size: int,
        expert_type: str = "swiglu",
        kernel: str = "auto",
        activation: str | None = None,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.expert_type = expert_type
        self.activation = resolve_activation(expert_type, activation)
        self.gated = expert_type == "swiglu"
        self.kernel = kernel
        rows_in = 2 * ffn_hidden_size if self.gated else ffn_hidden_size
        self.w_in = nn.Parameter(torch.empty(num_experts, rows_in, hidden_size))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> Experts:
        return cls(
            cfg.num_experts,
            cfg.hidden_size,
            cfg.ffn_hidden_size,
            cfg.expert_type,
            cfg.kernel,
            cfg.expert_activation,
        )

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.hidden_size**-0.5)
        nn.init.normal_(self.w_out, std=self.ffn_hidden_size**-0.5)

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, kernel: str | None = None
    ) -> torch.Tensor:
        """Apply expert e to its ``counts_E[e]`` consecutive rows of ``x_ND``.

        Eager: the fused kernel (or the per-expert loop). ``torch.compile``: the same, as the
        opaque op ``moeflow::experts_ffn``. ``torch.export``: plain aten ops with static shapes
        (:meth:`_forward_traceable`), so exported programs need no moeflow op.
        """
        if torch.compiler.is_exporting():
            return self._forward_traceable(x_ND, counts_E)
        # under torch.compile the grouped kernel runs as one opaque custom op
        run = experts_ffn_op if torch.compiler.is_compiling() else experts_eager
        return run(
            x_ND,
            counts_E,
            self.w_in,
            self.w_out,
            self.activation,
            self.gated,
            kernel or self.kernel,
        )

    def _forward_traceable(self, x_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """No data-dependent shapes, aten ops only (for torch.export). Each row gathers its
        expert's weights and one batched GEMM runs per projection (the layout transformers'
        ``batched_mm`` experts use): N weight copies of memory traffic, fine for inference
        batches, many times slower than the grouped kernel for large training steps."""
        E, N = self.num_experts, x_ND.shape[0]
        torch._check(counts_E.shape[0] == E)
        e_N = torch.arange(E, device=x_ND.device).repeat_interleave(counts_E, output_size=N)
        h_NX = torch.bmm(self.w_in[e_N].to(x_ND.dtype), x_ND.unsqueeze(-1)).squeeze(-1)
        a_NF = apply_activation(h_NX, self.activation, self.gated)
        return torch.bmm(self.w_out[e_N].to(x_ND.dtype), a_NF.unsqueeze(-1)).squeeze(-1)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, hidden={self.hidden_size}, "
            f"ffn={self.ffn_hidden_size}, type={self.expert_type}, "
            f"activation={self.activation}, kernel={self.kernel}"
        )


class SharedExperts(nn.Module):
    """Always-on experts applied to every token.

    DeepSeek's kind: ``num_shared_experts`` gated experts fused into one FFN of width
    ``n * F_shared``, added to the routed output. Qwen2-MoE's kind
    (``shared_expert_gate='sigmoid'``): the output is scaled by ``sigmoid(x w_g)`` per token.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        D, Fs = cfg.hidden_size, cfg.shared_ffn_size
        self.expert_type = cfg.expert_type
        self.activation = cfg.expert_activation
        self.gated = cfg.expert_type == "swiglu"
        rows_in = 2 * Fs if self.gated else Fs
        self.w_in = nn.Parameter(torch.empty(rows_in, D))
        self.w_out = nn.Parameter(torch.empty(D, Fs))
        self.gate = nn.Parameter(torch.zeros(1, D)) if cfg.shared_expert_gate == "sigmoid" else None
        nn.init.normal_(self.w_in, std=D**-0.5)
        nn.init.normal_(self.w_out, std=Fs**-0.5)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out_dtype = x_TD.dtype
        cd = compute_dtype(x_TD)  # fp32 for bf16 on CPUs without native bf16 GEMMs
        x_TD = x_TD.to(cd)
        h = F.linear(x_TD, self.w_in.to(cd))
        a = apply_activation(h, self.activation, self.gated)
        y_TD = F.linear(a, self.w_out.to(cd))
        if self.gate is not None:
            y_TD = torch.sigmoid(F.linear(x_TD, self.gate.to(cd))) * y_TD
        return y_TD.to(out_dtype)
