"""Routed experts stored as 3-D weights, and shared experts.

Shape legend: N rows grouped by expert, D hidden, F FFN width, E experts.
Layout matches transformers 5.x so weights copy without reshaping:
``w_in`` is (E, 2F, D) for SwiGLU (gate rows, then up rows) or (E, F, D) for GELU, and
``w_out`` is (E, D, F).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeflow.config import MoEConfig
from moeflow.kernels import expert_ffn
from moeflow.kernels.grouped import compute_dtype


class Experts(nn.Module):
    """E independent FFN experts evaluated with one grouped kernel call."""

    def __init__(self, num_experts: int, hidden_size: int, ffn_hidden_size: int,
                 expert_type: str = "swiglu", kernel: str = "auto"):
        super().__init__()
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.ffn_hidden_size = ffn_hidden_size
        self.expert_type = expert_type
        self.kernel = kernel
        rows_in = 2 * ffn_hidden_size if expert_type == "swiglu" else ffn_hidden_size
        self.w_in = nn.Parameter(torch.empty(num_experts, rows_in, hidden_size))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_size, ffn_hidden_size))
        self.reset_parameters()

    @classmethod
    def from_config(cls, cfg: MoEConfig) -> "Experts":
        return cls(cfg.num_experts, cfg.hidden_size, cfg.ffn_hidden_size, cfg.expert_type,
                   cfg.kernel)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_in, std=self.hidden_size ** -0.5)
        nn.init.normal_(self.w_out, std=self.ffn_hidden_size ** -0.5)

    def forward(self, x_ND: torch.Tensor, counts_E: torch.Tensor,
                kernel: str | None = None) -> torch.Tensor:
        """Apply expert e to its ``counts_E[e]`` consecutive rows of ``x_ND``."""
        return expert_ffn(x_ND, counts_E, self.w_in, self.w_out, self.expert_type,
                          kernel or self.kernel)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden={self.hidden_size}, "
                f"ffn={self.ffn_hidden_size}, type={self.expert_type}, kernel={self.kernel}")


class SharedExperts(nn.Module):
    """Always-on experts applied to every token.

    DeepSeek's kind: ``num_shared_experts`` SwiGLU experts fused into one FFN of width
    ``n * F_shared``, added to the routed output. Qwen2-MoE's kind
    (``shared_expert_gate='sigmoid'``): the output is scaled by ``sigmoid(x w_g)`` per token.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        D, Fs = cfg.hidden_size, cfg.shared_ffn_size
        self.expert_type = cfg.expert_type
        rows_in = 2 * Fs if cfg.expert_type == "swiglu" else Fs
        self.w_in = nn.Parameter(torch.empty(rows_in, D))
        self.w_out = nn.Parameter(torch.empty(D, Fs))
        self.gate = (nn.Parameter(torch.zeros(1, D)) if cfg.shared_expert_gate == "sigmoid"
                     else None)
        nn.init.normal_(self.w_in, std=D ** -0.5)
        nn.init.normal_(self.w_out, std=Fs ** -0.5)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        out_dtype = x_TD.dtype
        cd = compute_dtype(x_TD)  # fp32 for bf16 on CPUs without native bf16 GEMMs
        x_TD = x_TD.to(cd)
        h = F.linear(x_TD, self.w_in.to(cd))
        if self.expert_type == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate) * up
        else:
            a = F.gelu(h, approximate="tanh")
        y_TD = F.linear(a, self.w_out.to(cd))
        if self.gate is not None:
            y_TD = torch.sigmoid(F.linear(x_TD, self.gate.to(cd))) * y_TD
        return y_TD.to(out_dtype)
