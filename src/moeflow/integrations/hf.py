"""transformers (5.x) integration: convert MoE blocks into :class:`moeflow.MoELayer`.

* :func:`from_hf_block` builds a :class:`MoELayer` from one transformers MoE block, copying its
  weights (same dtype per tensor, same device, same train/eval mode).
* :func:`patch_model` replaces every supported MoE block of a model in place.

Shape legend: E experts, D hidden, F expert FFN width, Fs shared-expert FFN width.

transformers 5.x stores routed experts as 3-D tensors ``gate_up_proj`` (E, 2F, D) (gate rows,
then up rows) and ``down_proj`` (E, D, F): exactly our ``Experts.w_in`` / ``w_out``, so weights
copy without reshaping. Shared experts are ``gate_proj``/``up_proj``/``down_proj`` linears;
``[gate; up]`` stacked is our ``SharedExperts.w_in`` (2Fs, D).

A family is supported only where our router computes the same function (checked against the
transformers source of 5.24, and by the logits-equality tests in ``tests/integrations``):

==========================  =================================================================
block class                  routing in transformers -> moeflow router
==========================  =================================================================
MixtralSparseMoeBlock        softmax, top-k, renormalised            -> softmax_topk, norm=True
Qwen3MoeSparseMoeBlock,      softmax, top-k, renorm if               -> softmax_topk,
OlmoeSparseMoeBlock,         ``norm_topk_prob``                         norm=norm_topk_prob
Qwen3VLMoeTextSparseMoeBlock
Qwen2MoeSparseMoeBlock       as Qwen3 + shared expert scaled by      -> + SharedExperts,
                             ``sigmoid(x w_g)``                         gate='sigmoid'
GraniteMoeMoE                softmax over the top-k logits           -> softmax_topk, norm=True
                             (= renormalised top-k of the softmax)
DeepseekV2Moe                softmax, greedy or group-limited (group -> deepseek, softmax,
                             score = max), * routed_scaling_factor      no renorm, + shared
DeepseekV3MoE                sigmoid + e_score_correction_bias for   -> deepseek, sigmoid,
                             choice, group score = sum of top-2,        correction_bias,
                             renorm, * routed_scaling_factor            + shared
==========================  =================================================================

Also converted, because their block/router/experts source is identical to one of the above in
transformers 5.24 (class-name prefix aside; block-level tests check each): MiniMax (as Mixtral),
Mellum (as Qwen3), Qwen3-Next (as Qwen2), DeepSeek-OCR2 and UnlimitedOCR text MoE (as V2),
dots1, Kimi-Linear and Bailing-hybrid (as V3).

Everything else that looks like an MoE block raises :class:`UnsupportedModelError` naming the
class (e.g. PhiMoE's sparsemixer routing, Switch/NLLB capacity routers, GPT-OSS biased experts).
Mixtral's training-time ``router_jitter_noise`` has no moeflow equivalent: a block with a
non-zero jitter is refused unless ``allow_train_mismatch=True`` (eval outputs are unaffected).

Routing decisions: the softmax-top-k families compute their router GEMM in the activation
dtype, so converted layers use ``router_dtype="input"`` and pick the same experts in bf16 too;
DeepSeek routers run in fp32 in both libraries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from moeflow.config import MoEConfig
from moeflow.errors import UnsupportedModelError
from moeflow.layer.moe import MoELayer

__all__ = ["from_hf_block", "patch_model", "PatchSummary", "is_moe_block", "supported_classes"]


# --------------------------------------------------------------------------- checks
def _fail(block: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(block).__name__} cannot be converted to a moeflow MoELayer: {why}")


def _is_silu(act: nn.Module) -> bool:
    return type(act).__name__ in ("SiLU", "SiLUActivation")


def _check_experts(block: nn.Module, experts: nn.Module) -> None:
    """The 3-D expert layout we copy: concatenated [gate; up], not transposed, no bias, SiLU."""
    for name, want in (("has_gate", True), ("has_bias", False), ("is_transposed", False),
                       ("is_concatenated", True), ("has_post_expert_norm", False)):
        got = getattr(experts, name, want)
        if got != want:
            raise _fail(block, f"its experts have {name}={got} (moeflow needs {want})")
    for name in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, name, None), torch.Tensor):
            raise _fail(block, f"its experts have no 3-D '{name}' weight")
    if not _is_silu(experts.act_fn):
        raise _fail(block, f"expert activation {type(experts.act_fn).__name__} is not SiLU "
                           "(moeflow's gated experts are SwiGLU)")


def _check_mlp(block: nn.Module, mlp: nn.Module) -> None:
    """A shared-expert MLP: gate_proj/up_proj/down_proj linears without bias, SiLU."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear):
            raise _fail(block, f"its shared expert has no linear '{name}'")
        if lin.bias is not None:
            raise _fail(block, f"its shared expert '{name}' has a bias (moeflow has none)")
    if not _is_silu(mlp.act_fn):
        raise _fail(block, f"shared-expert activation {type(mlp.act_fn).__name__} is not SiLU")


# --------------------------------------------------------------------------- per family
@dataclass
class _Plan:
    """What a converter reads off a block: the config and where each tensor lives."""

    cfg: MoEConfig
    router_weight: torch.Tensor
    experts: nn.Module
    correction_bias: Optional[torch.Tensor] = None
    shared_mlp: Optional[nn.Module] = None
    shared_gate_weight: Optional[torch.Tensor] = None


def _experts_dims(experts: nn.Module):
    E, two_F, D = experts.gate_up_proj.shape
    return E, two_F // 2, D


def _softmax_topk(block, router, experts, norm_topk_prob: bool, **extra) -> _Plan:
    _check_experts(block, experts)
    E, F, D = _experts_dims(experts)
    if getattr(router, "bias", None) is not None:
        raise _fail(block, "its router has a bias")
    # These routers run their GEMM in the activation dtype (softmax in fp32): router_dtype
    # "input" reproduces that, so bf16 routing decisions match transformers too.
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=int(router.top_k),
                    router="softmax_topk", norm_topk_prob=bool(norm_topk_prob),
                    router_dtype="input", **extra)
    return _Plan(cfg, router.weight, experts)


def _mixtral(block, allow_train_mismatch):
    jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)
    if jitter > 0 and not allow_train_mismatch:
        raise _fail(block, f"router_jitter_noise={jitter} (training-time input noise) has no "
                           "moeflow equivalent; pass allow_train_mismatch=True to convert "
                           "anyway (eval outputs match, training differs)")
    return _softmax_topk(block, block.gate, block.experts, norm_topk_prob=True)


def _qwen3(block, allow_train_mismatch):
    return _softmax_topk(block, block.gate, block.experts,
                         norm_topk_prob=bool(block.gate.norm_topk_prob))


def _qwen3_vl(block, allow_train_mismatch):
    # Qwen3-VL-MoE's text router always renormalises the top-k probabilities.
    return _softmax_topk(block, block.gate, block.experts, norm_topk_prob=True)


def _granite(block, allow_train_mismatch):
    # softmax(topk(logits)) == topk(softmax(logits)) renormalised: same weights, same experts.
    return _softmax_topk(block, block.router, block.experts, norm_topk_prob=True)


def _qwen2(block, allow_train_mismatch):
    _check_mlp(block, block.shared_expert)
    gate = block.shared_expert_gate
    if not isinstance(gate, nn.Linear) or gate.out_features != 1 or gate.bias is not None:
        raise _fail(block, "its shared_expert_gate is not a bias-free Linear(D, 1)")
    plan = _softmax_topk(block, block.gate, block.experts,
                         norm_topk_prob=bool(block.gate.norm_topk_prob),
                         num_shared_experts=1,
                         shared_ffn_hidden_size=int(block.shared_expert.gate_proj.out_features),
                         shared_expert_gate="sigmoid")
    plan.shared_mlp = block.shared_expert
    plan.shared_gate_weight = gate.weight
    return plan


def _shared_fields(block, mlp, n_shared: int) -> dict:
    _check_mlp(block, mlp)
    Fs = int(mlp.gate_proj.out_features)
    n = n_shared if n_shared >= 1 and Fs % n_shared == 0 else 1
    return dict(num_shared_experts=n, shared_ffn_hidden_size=Fs // n)


def _deepseek_v2(block, allow_train_mismatch):
    router, experts = block.gate, block.experts
    _check_experts(block, experts)
    E, F, D = _experts_dims(experts)
    method = router.topk_method
    if method == "greedy":
        n_group, topk_group = 1, 1
    elif method == "group_limited_greedy":
        n_group, topk_group = int(router.num_group), int(router.topk_group)
    else:
        raise _fail(block, f"topk_method={method!r} (supported: 'greedy', "
                           "'group_limited_greedy')")
    # V2 masks ineligible softmax scores to 0 (we use -inf): same top-k while top_k <= the
    # eligible experts, which MoEConfig validates, and softmax scores are > 0.
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=int(router.top_k),
                    router="deepseek", score_func="softmax", n_group=n_group,
                    topk_group=topk_group, norm_topk_prob=False,
                    routed_scaling_factor=float(router.routed_scaling_factor),
                    **_shared_fields(block, block.shared_experts,
                                     int(getattr(block.config, "n_shared_experts", 1) or 1)))
    return _Plan(cfg, router.weight, experts, shared_mlp=block.shared_experts)


def _deepseek_v3(block, allow_train_mismatch):
    router, experts = block.gate, block.experts
    _check_experts(block, experts)
    E, F, D = _experts_dims(experts)
    if E // int(router.num_group) < 2:
        raise _fail(block, "groups of one expert (transformers takes the top-2 per group)")
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, top_k=int(router.top_k),
                    router="deepseek", score_func="sigmoid", n_group=int(router.num_group),
                    topk_group=int(router.topk_group),
                    norm_topk_prob=bool(router.norm_topk_prob),
                    routed_scaling_factor=float(router.routed_scaling_factor),
                    correction_bias=True,
                    **_shared_fields(block, block.shared_experts,
                                     int(getattr(block.config, "n_shared_experts", 1) or 1)))
    return _Plan(cfg, router.weight, experts, correction_bias=router.e_score_correction_bias,
                 shared_mlp=block.shared_experts)


# Families after the first line of each group have block, router and experts source identical
# to the first one's in transformers 5.24 (class-name prefix aside); the structural checks
# above still run on every block.
_CONVERTERS: dict[str, Callable] = {
    "MixtralSparseMoeBlock": _mixtral,
    "MiniMaxSparseMoeBlock": _mixtral,
    "Qwen3MoeSparseMoeBlock": _qwen3,
    "OlmoeSparseMoeBlock": _qwen3,
    "MellumSparseMoeBlock": _qwen3,
    "Qwen3VLMoeTextSparseMoeBlock": _qwen3_vl,
    "Qwen2MoeSparseMoeBlock": _qwen2,
    "Qwen3NextSparseMoeBlock": _qwen2,
    "GraniteMoeMoE": _granite,
    "DeepseekV2Moe": _deepseek_v2,
    "DeepseekOcr2TextMoe": _deepseek_v2,
    "UnlimitedOcrTextMoe": _deepseek_v2,
    "DeepseekV3MoE": _deepseek_v3,
    "Dots1MoE": _deepseek_v3,
    "KimiLinearMoE": _deepseek_v3,
    "BailingHybridMoE": _deepseek_v3,
}


def supported_classes() -> list[str]:
    """Names of the transformers block classes :func:`from_hf_block` converts."""
    return sorted(_CONVERTERS)


# --------------------------------------------------------------------------- conversion
def _copy_(dst: nn.Parameter | torch.Tensor, src: torch.Tensor) -> None:
    """Make ``dst`` hold a copy of ``src`` with src's dtype and device."""
    dst.data = src.detach().clone()


@torch.no_grad()
def from_hf_block(block: nn.Module, *, allow_train_mismatch: bool = False,
                  kernel: str = "auto") -> MoELayer:
    """Build a :class:`MoELayer` that computes what the transformers MoE ``block`` computes.

    Weights are copied (not shared); every tensor keeps its dtype and device, and the layer is
    put in the block's train/eval mode. ``kernel`` picks the expert kernel (``MoEConfig.kernel``).

    Raises:
        UnsupportedModelError: the block's class is not one moeflow reproduces exactly.
    """
    name = type(block).__name__
    conv = _CONVERTERS.get(name)
    if conv is None:
        raise UnsupportedModelError(
            f"{name} is not a supported transformers MoE block; supported: "
            f"{', '.join(supported_classes())}")
    plan = conv(block, allow_train_mismatch)
    cfg = plan.cfg.replace(kernel=kernel) if kernel != plan.cfg.kernel else plan.cfg
    layer = MoELayer(cfg)
    _copy_(layer.router.weight, plan.router_weight)
    _copy_(layer.experts.w_in, plan.experts.gate_up_proj)
    _copy_(layer.experts.w_out, plan.experts.down_proj)
    if plan.correction_bias is not None:
        layer.router.correction_bias.data = plan.correction_bias.detach().clone()
    if plan.shared_mlp is not None:
        m = plan.shared_mlp
        _copy_(layer.shared.w_in, torch.cat([m.gate_proj.weight, m.up_proj.weight], dim=0))
        _copy_(layer.shared.w_out, m.down_proj.weight)
        if plan.shared_gate_weight is not None:
            _copy_(layer.shared.gate, plan.shared_gate_weight)
    layer.train(block.training)
    return layer


# --------------------------------------------------------------------------- model patching
_MOE_NAME = re.compile(r"(SparseMoeBlock|SparseMoEBlock|Moe|MoE|MoeLayer|MoELayer|SparseMLP)$")


def is_moe_block(module: nn.Module) -> bool:
    """Heuristic for "this is an MoE block": a class name that ends like one
    (``...SparseMoeBlock``, ``...Moe``, ``...MoE``, ``...MoELayer``, ``...SparseMLP``), or an
    ``experts`` child next to a ``gate`` or ``router`` child."""
    if isinstance(module, MoELayer):
        return False
    if _MOE_NAME.search(type(module).__name__):
        return True
    children = dict(module.named_children())
    return "experts" in children and ("gate" in children or "router" in children)


@dataclass
class PatchSummary:
    """What :func:`patch_model` replaced: ``(module path, transformers class)`` pairs."""

    replaced: list[tuple[str, str]] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.replaced)

    def by_class(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for _, cls in self.replaced:
            out[cls] = out.get(cls, 0) + 1
        return out

    def __str__(self) -> str:
        parts = ", ".join(f"{n} x {c}" for c, n in sorted(self.by_class().items()))
        return f"moeflow replaced {self.count} MoE block(s): {parts or 'none'}"


def _tap_forward(logits_TE: torch.Tensor):
    """Forward of the router-logits tap: transformers records ``output[0]``."""
    return (logits_TE,)


def _tap_extra_repr() -> str:
    return "moeflow router-logits tap (no parameters)"


def _emit_router_logits(router: nn.Module, inputs, routing) -> None:
    """Forward hook on our router: pass the logits (in the activation dtype) to the tap."""
    router.hf_logits_tap(routing.logits_TE.to(inputs[0].dtype))


def _attach_router_logits_tap(layer: MoELayer, block: nn.Module) -> None:
    """Give ``layer.router`` a child that is an instance of the block's transformers router
    class (made without running its ``__init__``: no parameters), called with the router logits
    on every forward, so transformers' ``OutputRecorder(<RouterClass>)`` still sees them."""
    hf_router = getattr(block, "gate", None)
    if not isinstance(hf_router, nn.Module):
        hf_router = getattr(block, "router", None)
    if not isinstance(hf_router, nn.Module):
        return False
    cls = type(hf_router)
    tap = cls.__new__(cls)
    nn.Module.__init__(tap)
    tap.forward = _tap_forward
    tap.extra_repr = _tap_extra_repr
    layer.router.hf_logits_tap = tap
    layer.router.register_forward_hook(_emit_router_logits)
    return True


def _hook_taps(model: nn.Module, taps: list) -> None:
    """transformers installs its output-recording hooks once, on the first forward. If that
    already happened, hook the new taps the same way (with the capture tasks of the nearest
    enclosing transformers model, as transformers itself dispatches them)."""
    if not taps:
        return
    try:
        from transformers.modeling_utils import PreTrainedModel
        from transformers.utils import output_capturing as oc
    except ImportError:
        return
    hooked = [(p, m) for p, m in model.named_modules()
              if isinstance(m, PreTrainedModel) and getattr(m, "_output_capturing_hooks_installed",
                                                            False)]
    for tap_path, tap in taps:
        owners = [(p, m) for p, m in hooked if p == "" or tap_path.startswith(p + ".")]
        if not owners:
            continue
        owner_path, owner = max(owners, key=lambda pm: len(pm[0]))
        tasks = []
        for key, specs in oc._CAN_RECORD_REGISTRY.get(owner).items():
            for spec in specs if isinstance(specs, list) else [specs]:
                if isinstance(spec, oc.OutputRecorder):
                    tasks.append((key, spec))
        rel = tap_path[len(owner_path) + 1:] if owner_path else tap_path
        oc.recursively_install_hooks(tap, rel, tasks)


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MoE blocks, outermost first; the insides of a block are not searched."""
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if is_moe_block(child):
                found.append((path, child))
            else:
                walk(path, child)

    if is_moe_block(model):
        return [("", model)]
    walk("", model)
    return found


def patch_model(model: nn.Module, *, allow_train_mismatch: bool = False,
                kernel: str = "auto") -> nn.Module:
    """Replace every supported transformers MoE block of ``model`` with a :class:`MoELayer`.

    All blocks are checked before anything changes: if any MoE block is unsupported,
    :class:`UnsupportedModelError` names its class and the model is left untouched. Non-MoE
    modules are never touched. Returns ``model``; the :class:`PatchSummary` of what was
    replaced is also stored as ``model.moeflow_patch_summary``.

    transformers' ``output_router_logits=True`` (and its load-balancing loss) keeps working: each
    layer re-emits its router logits through a parameter-free stand-in of the transformers
    router class, which is what transformers' output recorder hooks.
    """
    blocks = _find_blocks(model)
    if blocks and blocks[0][0] == "":
        raise UnsupportedModelError(
            f"patch_model expects a model that contains MoE blocks; got the block "
            f"{type(model).__name__} itself (use from_hf_block)")
    layers = [(path, block, from_hf_block(block, allow_train_mismatch=allow_train_mismatch,
                                          kernel=kernel))
              for path, block in blocks]
    summary = PatchSummary()
    taps = []
    for path, block, layer in layers:
        if _attach_router_logits_tap(layer, block):
            taps.append((f"{path}.router.hf_logits_tap", layer.router.hf_logits_tap))
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, layer)
        summary.replaced.append((path, type(block).__name__))
    _hook_taps(model, taps)
    model.moeflow_patch_summary = summary
    return model
