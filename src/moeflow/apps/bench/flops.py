"""FLOPs of an MoE step: analytic formulas, a FlopCounterMode formula for grouped GEMMs, MFU.

Conventions (those of ``torch.utils.flop_counter``, so the two counts can be compared):
a multiply-add is 2 FLOPs; attention scores are counted over the full ``Lq x Lk`` rectangle
(a causal mask does not halve them); element-wise work (softmax, norms, activations) is not
counted; an embedding lookup is 0 FLOPs. Backward is twice the forward GEMMs (data and weight
gradients), except that the embedding's and the attention core's inputs need no weight
gradient: the attention core backward is twice its forward as well (4 batched GEMMs).

The MoE layer counts *routed* work: ``N`` assignments (``T*k`` when dropless; fewer when a
capacity drops tokens) through the experts, not ``T*E``; a padded ``bmm`` kernel runs more
FLOPs than that, which is overhead, not model FLOPs (MegaBlocks, MLSys'23, §3).

MFU (PaLM, Chowdhery et al. 2022, App. B) = model FLOPs per step / step time / peak FLOP/s,
with model FLOPs from these formulas (recomputation not counted); the rule-of-thumb
``6 * N_active * tokens`` (Kaplan et al. 2020, Eq. 2.1 with the active parameters of an MoE)
is reported beside it.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

from moeflow.config import MoEConfig


# ------------------------------------------------------------------ analytic, forward only
def attention_flops(
    tokens: int,
    hidden: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    batch: int,
    q_len: int,
    kv_len: int,
) -> dict:
    """Forward FLOPs of one attention layer: projections and the core (QK^T, then AV)."""
    proj = (
        2 * tokens * hidden * (heads + 2 * kv_heads) * head_dim
        + 2 * tokens * heads * head_dim * hidden
    )
    core = 2 * 2 * batch * heads * q_len * kv_len * head_dim
    return {"proj": proj, "core": core}


def moe_flops(cfg: MoEConfig, tokens: int, routed: int | None = None) -> dict:
    """Forward FLOPs of one MoE layer: router ``2TDE``, experts over ``routed`` assignments
    (``T*k`` by default): ``6NDF`` for gated (SwiGLU) experts, ``4NDF`` for plain ones, and
    the shared experts on every token."""
    D, F, E = cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_experts
    n = tokens * cfg.top_k if routed is None else routed
    per_row = (6 if cfg.expert_type == "swiglu" else 4) * D * F
    shared = 0
    if cfg.num_shared_experts:
        shared = (6 if cfg.expert_type == "swiglu" else 4) * D * cfg.shared_ffn_size * tokens
        if cfg.shared_expert_gate == "sigmoid":
            shared += 2 * tokens * D
    return {"router": 2 * tokens * D * E, "experts": n * per_row, "shared": shared}


def embedding_flops(tokens: int, hidden: int, vocab: int) -> dict:
    """The lookup is free; the output projection to the vocabulary is ``2TDV``."""
    return {"lookup": 0, "lm_head": 2 * tokens * hidden * vocab}


def step_flops(
    dims: dict,
    *,
    batch: int,
    q_len: int,
    kv_len: int,
    train: bool,
    routed_per_layer: list[int] | None = None,
    recompute: bool = False,
) -> dict:
    """FLOPs of one step per breakdown row (``attention``, ``moe_router``, ``moe_experts``,
    ``lm_head``), with ``forward`` / ``backward`` apart and ``total``; ``dims`` is
    :func:`moeflow.apps.bench.workloads.model_dims`. ``recompute`` adds the blocks' second forward
    to ``hardware_total`` (not to ``total``, the model FLOPs)."""
    T = batch * q_len
    L = dims["layers"]
    att = attention_flops(
        T, dims["hidden"], dims["heads"], dims["kv_heads"], dims["head_dim"], batch, q_len, kv_len
    )
    n_moe = dims["moe_layers"]
    routed = routed_per_layer or [None] * n_moe
    moe = [moe_flops(dims["moe"], T, r) for r in routed]
    emb = embedding_flops(T, dims["hidden"], dims["vocab"])
    fwd = {
        "attention": L * (att["proj"] + att["core"]),
        "moe_router": sum(m["router"] for m in moe),
        "moe_experts": sum(m["experts"] + m["shared"] for m in moe),
        "lm_head": emb["lm_head"],
        "embedding": emb["lookup"],
    }
    out = {"forward": fwd}
    if train:
        out["backward"] = {k: 2 * v for k, v in fwd.items()}
    out["total"] = sum(sum(p.values()) for p in out.values())
    blocks = fwd["attention"] + fwd["moe_router"] + fwd["moe_experts"]
    out["hardware_total"] = out["total"] + (blocks if (train and recompute) else 0)
    return out


def active_params(model: torch.nn.Module) -> tuple[int, int]:
    """(total, active) parameters: an MoE layer's routed experts count ``top_k/E`` of theirs."""
    from moeflow.apps.bench.workloads import moe_layers

    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for m in moe_layers(model):
        layer = getattr(m, "layer", m)
        cfg = layer.cfg
        n = layer.experts.w_in.numel() + layer.experts.w_out.numel()
        inactive += n - n * cfg.top_k // cfg.num_experts
    return total, total - inactive


def mfu(model_flops: float, step_ms: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the stated peak."""
    return model_flops / (step_ms * 1e-3) / peak_flops


# ------------------------------------------------------------------ FlopCounterMode formulas
def grouped_mm_flop(a_shape, b_shape, offs_shape=None, *args, out_shape=None, **kwargs) -> int:
    """``torch._grouped_mm``: every output element is one dot product over the shared K.

    2-D x 3-D (rows of ``a`` split by ``offs``, one ``b`` per group): ``2*M*K*N``;
    2-D x 2-D (K split by ``offs``: one (M, N) product per group, weight gradients):
    ``2*M*K*N`` over the whole K; 3-D x 3-D (batched): ``2*G*M*K*N``; 3-D x 2-D (columns of
    ``b`` split by ``offs``): ``2*M*K*N`` over all columns.
    """
    if len(a_shape) == 2 and len(b_shape) == 3:
        (m, k), (_, _, n) = a_shape, b_shape
        return 2 * m * k * n
    if len(a_shape) == 2 and len(b_shape) == 2:
        (m, k), (_, n) = a_shape, b_shape
        return 2 * m * k * n
    if len(a_shape) == 3 and len(b_shape) == 3:
        (g, m, k), (_, _, n) = a_shape, b_shape
        return 2 * g * m * k * n
    (_, m, k), (_, n) = a_shape, b_shape
    return 2 * m * k * n


def sdpa_cpu_flop(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU flash attention: ``QK^T`` and ``AV`` over the full rectangle, GQA broadcast."""
    b, h, s_q, d = q_shape
    s_k, d_v = k_shape[2], v_shape[3]
    return 2 * b * h * s_q * s_k * d + 2 * b * h * s_q * s_k * d_v


def _sdpa_cpu_backward_flop(
    grad_out_shape, q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs
) -> int:
    """Its backward: dV, dP, dQ and dK, four products of the forward's sizes."""
    return 2 * sdpa_cpu_flop(q_shape, k_shape, v_shape)


def register_formulas() -> None:
    """Register the grouped-GEMM and CPU-attention formulas once (idempotent)."""
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    table = [
        (getattr(aten, "_grouped_mm", None), grouped_mm_flop),
        (getattr(aten, "_scaled_dot_product_flash_attention_for_cpu", None), sdpa_cpu_flop),
        (
            getattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None),
            _sdpa_cpu_backward_flop,
        ),
    ]
    for target, formula in table:
        if target is not None and target not in flop_registry:
            register_flop_formula(target)(formula)


def count_flops(fn) -> tuple[int, dict]:
    """Run ``fn()`` under ``FlopCounterMode``: (total FLOPs, {operator: FLOPs})."""
    register_formulas()
    with FlopCounterMode(display=False) as mode:
        fn()
    per_op = {str(k): int(v) for k, v in mode.get_flop_counts().get("Global", {}).items()}
    return int(mode.get_total_flops()), per_op
