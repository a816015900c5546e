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
transformers source of 5.24 and 5.25, and by the logits-equality tests in ``tests/integrations``):

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
transformers 5.24 and 5.25 (class-name prefix aside; block-level tests check each): MiniMax (as
Mixtral), Mellum (as Qwen3), Qwen3-Next (as Qwen2), DeepSeek-OCR2 and UnlimitedOCR text MoE (as
V2), dots1 and Kimi-Linear (as V3). Bailing-hybrid is DeepSeek-V3's source in 5.24; from 5.25 its
experts and shared experts can clip the SwiGLU per layer (``swiglu_limits``,
``swiglu_limits_shared``: ``act(gate)`` at most ``limit``, ``up`` within ``+-limit``), which
moeflow does not do, so it is converted (as V3) only where the block's limits are off (0 or
unset), and raises :class:`UnsupportedModelError` otherwise.

Everything else that looks like an MoE block raises :class:`UnsupportedModelError` naming the
class (e.g. PhiMoE's sparsemixer routing, Switch/NLLB capacity routers, GPT-OSS biased experts).

Expert activations: transformers' ``hidden_act`` ``silu``/``swish``, ``gelu`` (exact),
``gelu_new``/``gelu_pytorch_tanh`` (tanh approximation) and ``relu`` map to
``MoEConfig.activation``; the shared expert must use the routed experts' activation. Mixtral's
``router_jitter_noise`` is reproduced: in training mode the block input is multiplied by
``U(1 - j, 1 + j)`` noise drawn exactly as transformers draws it (same values under the same
seed), identity in eval mode.

A patched model keeps transformers' view of its weights (:func:`patch_model`): ``state_dict()``
and ``save_pretrained`` give transformers' key names and layouts through one
:class:`~moeflow.checkpoint.hf_keys.StateDictAdapter` per family, ``load_state_dict`` takes
them back, ``init_weights()`` initialises the moeflow tensors as transformers initialises the
block's, and the parallelism plans drop the entries of the replaced modules.

Routing decisions: the softmax-top-k families compute their router GEMM in the activation
dtype, so converted layers use ``router_dtype="input"`` and pick the same experts in bf16 too;
DeepSeek routers run in fp32 in both libraries.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moeflow.checkpoint.hf_keys import ADAPTERS, StateDictAdapter
from moeflow.config import MoEConfig
from moeflow.errors import UnsupportedModelError
from moeflow.layer.moe import MoELayer

__all__ = [
    "from_hf_block",
    "patch_model",
    "PatchSummary",
    "is_moe_block",
    "supported_classes",
    "state_dict_adapter",
    "moeflow_state_dict_keys",
    "HFBlockView",
]


# --------------------------------------------------------------------------- checks
def _fail(block: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"{type(block).__name__} cannot be converted to a moeflow MoELayer: {why}"
    )


# transformers activation modules (ACT2CLS of 5.24) -> MoEConfig.activation
_ACTIVATIONS = {
    "SiLU": "silu",
    "SiLUActivation": "silu",
    "GELUActivation": "gelu",
    "NewGELUActivation": "gelu_tanh",
    "GELUTanh": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "ReLU": "relu",
}


def _activation(block: nn.Module, act: nn.Module, what: str) -> str:
    """MoEConfig.activation for a transformers activation module."""
    name = type(act).__name__
    if name == "GELU":  # torch.nn.GELU
        return "gelu_tanh" if act.approximate == "tanh" else "gelu"
    if name not in _ACTIVATIONS:
        raise _fail(
            block,
            f"{what} activation {name} is not supported (moeflow has "
            f"{sorted(set(_ACTIVATIONS.values()))})",
        )
    return _ACTIVATIONS[name]


def _check_unclipped(block: nn.Module, module: nn.Module, what: str) -> None:
    """No SwiGLU clipping: transformers experts/MLPs that clip (GPT-OSS, Step3p7, Bailing-hybrid
    from 5.25) hold the clip value in ``limit``, None where clipping is off."""
    limit = getattr(module, "limit", None)
    if limit is not None:
        raise _fail(block, f"its {what} clip the SwiGLU at limit={limit} (moeflow does not clip)")


def _check_experts(block: nn.Module, experts: nn.Module) -> str:
    """The 3-D expert layout we copy: concatenated [gate; up], not transposed, no bias, no
    SwiGLU clipping. Returns the experts' activation."""
    for name, want in (
        ("has_gate", True),
        ("has_bias", False),
        ("is_transposed", False),
        ("is_concatenated", True),
        ("has_post_expert_norm", False),
    ):
        got = getattr(experts, name, want)
        if got != want:
            raise _fail(block, f"its experts have {name}={got} (moeflow needs {want})")
    for name in ("gate_up_proj", "down_proj"):
        if not isinstance(getattr(experts, name, None), torch.Tensor):
            raise _fail(block, f"its experts have no 3-D '{name}' weight")
    _check_unclipped(block, experts, "experts")
    return _activation(block, experts.act_fn, "expert")


def _check_mlp(block: nn.Module, mlp: nn.Module, activation: str) -> None:
    """A shared-expert MLP: gate_proj/up_proj/down_proj linears without bias, no SwiGLU clipping,
    and the routed experts' activation (moeflow has one activation per layer)."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(mlp, name, None)
        if not isinstance(lin, nn.Linear):
            raise _fail(block, f"its shared expert has no linear '{name}'")
        if lin.bias is not None:
            raise _fail(block, f"its shared expert '{name}' has a bias (moeflow has none)")
    _check_unclipped(block, mlp, "shared experts")
    got = _activation(block, mlp.act_fn, "shared-expert")
    if got != activation:
        raise _fail(block, f"shared-expert activation {got} differs from the experts' {activation}")


# --------------------------------------------------------------------------- per family
@dataclass
class _Plan:
    """What a converter reads off a block: the config and where each tensor lives."""

    cfg: MoEConfig
    router_weight: torch.Tensor
    experts: nn.Module
    correction_bias: torch.Tensor | None = None
    shared_mlp: nn.Module | None = None
    shared_gate_weight: torch.Tensor | None = None
    jitter_noise: float = 0.0


def _experts_dims(experts: nn.Module):
    E, two_F, D = experts.gate_up_proj.shape
    return E, two_F // 2, D


def _act_field(activation: str) -> dict:
    """MoEConfig's activation field: left at its default for SiLU (SwiGLU)."""
    return {} if activation == "silu" else dict(activation=activation)


def _softmax_topk(block, router, experts, norm_topk_prob: bool, **extra) -> _Plan:
    act = _check_experts(block, experts)
    E, F, D = _experts_dims(experts)
    if getattr(router, "bias", None) is not None:
        raise _fail(block, "its router has a bias")
    # These routers run their GEMM in the activation dtype (softmax in fp32): router_dtype
    # "input" reproduces that, so bf16 routing decisions match transformers too.
    cfg = MoEConfig(
        hidden_size=D,
        ffn_hidden_size=F,
        num_experts=E,
        top_k=int(router.top_k),
        router="softmax_topk",
        norm_topk_prob=bool(norm_topk_prob),
        router_dtype="input",
        **_act_field(act),
        **extra,
    )
    return _Plan(cfg, router.weight, experts)


def _mixtral(block):
    plan = _softmax_topk(block, block.gate, block.experts, norm_topk_prob=True)
    jitter = float(getattr(block, "jitter_noise", 0.0) or 0.0)
    if jitter < 0:
        raise _fail(block, f"router_jitter_noise={jitter} is negative")
    plan.jitter_noise = jitter
    return plan


def _qwen3(block):
    return _softmax_topk(
        block, block.gate, block.experts, norm_topk_prob=bool(block.gate.norm_topk_prob)
    )


def _qwen3_vl(block):
    # Qwen3-VL-MoE's text router always renormalises the top-k probabilities.
    return _softmax_topk(block, block.gate, block.experts, norm_topk_prob=True)


def _granite(block):
    # softmax(topk(logits)) == topk(softmax(logits)) renormalised: same weights, same experts.
    return _softmax_topk(block, block.router, block.experts, norm_topk_prob=True)


def _qwen2(block):
    act = _check_experts(block, block.experts)
    _check_mlp(block, block.shared_expert, act)
    gate = block.shared_expert_gate
    if not isinstance(gate, nn.Linear) or gate.out_features != 1 or gate.bias is not None:
        raise _fail(block, "its shared_expert_gate is not a bias-free Linear(D, 1)")
    plan = _softmax_topk(
        block,
        block.gate,
        block.experts,
        norm_topk_prob=bool(block.gate.norm_topk_prob),
        num_shared_experts=1,
        shared_ffn_hidden_size=int(block.shared_expert.gate_proj.out_features),
        shared_expert_gate="sigmoid",
    )
    plan.shared_mlp = block.shared_expert
    plan.shared_gate_weight = gate.weight
    return plan


def _shared_fields(block, mlp, n_shared: int, activation: str) -> dict:
    _check_mlp(block, mlp, activation)
    Fs = int(mlp.gate_proj.out_features)
    n = n_shared if n_shared >= 1 and Fs % n_shared == 0 else 1
    return dict(num_shared_experts=n, shared_ffn_hidden_size=Fs // n)


def _deepseek_v2(block):
    router, experts = block.gate, block.experts
    act = _check_experts(block, experts)
    E, F, D = _experts_dims(experts)
    method = router.topk_method
    if method == "greedy":
        n_group, topk_group = 1, 1
    elif method == "group_limited_greedy":
        n_group, topk_group = int(router.num_group), int(router.topk_group)
    else:
        raise _fail(block, f"topk_method={method!r} (supported: 'greedy', 'group_limited_greedy')")
    # V2 masks ineligible softmax scores to 0 (we use -inf): same top-k while top_k <= the
    # eligible experts, which MoEConfig validates, and softmax scores are > 0.
    cfg = MoEConfig(
        hidden_size=D,
        ffn_hidden_size=F,
        num_experts=E,
        top_k=int(router.top_k),
        router="deepseek",
        score_func="softmax",
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=False,
        routed_scaling_factor=float(router.routed_scaling_factor),
        **_act_field(act),
        **_shared_fields(
            block, block.shared_experts, int(getattr(block.config, "n_shared_experts", 1) or 1), act
        ),
    )
    return _Plan(cfg, router.weight, experts, shared_mlp=block.shared_experts)


def _deepseek_v3(block):
    router, experts = block.gate, block.experts
    act = _check_experts(block, experts)
    E, F, D = _experts_dims(experts)
    if E // int(router.num_group) < 2:
        raise _fail(block, "groups of one expert (transformers takes the top-2 per group)")
    cfg = MoEConfig(
        hidden_size=D,
        ffn_hidden_size=F,
        num_experts=E,
        top_k=int(router.top_k),
        router="deepseek",
        score_func="sigmoid",
        n_group=int(router.num_group),
        topk_group=int(router.topk_group),
        norm_topk_prob=bool(router.norm_topk_prob),
        routed_scaling_factor=float(router.routed_scaling_factor),
        correction_bias=True,
        **_act_field(act),
        **_shared_fields(
            block, block.shared_experts, int(getattr(block.config, "n_shared_experts", 1) or 1), act
        ),
    )
    return _Plan(
        cfg,
        router.weight,
        experts,
        correction_bias=router.e_score_correction_bias,
        shared_mlp=block.shared_experts,
    )


# Families after the first line of each group have block, router and experts source identical
# to the first one's in transformers 5.24 (class-name prefix aside; Bailing-hybrid from 5.25
# adds SwiGLU clipping, which _check_unclipped rejects where it is on); the structural checks
# above still run on every block, and the block's state-dict keys must be the adapter's.
_CONVERTERS: dict[str, tuple[Callable, str]] = {
    "MixtralSparseMoeBlock": (_mixtral, "gate_experts"),
    "MiniMaxSparseMoeBlock": (_mixtral, "gate_experts"),
    "Qwen3MoeSparseMoeBlock": (_qwen3, "gate_experts"),
    "OlmoeSparseMoeBlock": (_qwen3, "gate_experts"),
    "MellumSparseMoeBlock": (_qwen3, "gate_experts"),
    "Qwen3VLMoeTextSparseMoeBlock": (_qwen3_vl, "gate_experts"),
    "Qwen2MoeSparseMoeBlock": (_qwen2, "qwen2_moe"),
    "Qwen3NextSparseMoeBlock": (_qwen2, "qwen2_moe"),
    "GraniteMoeMoE": (_granite, "granitemoe"),
    "DeepseekV2Moe": (_deepseek_v2, "deepseek_v2"),
    "DeepseekOcr2TextMoe": (_deepseek_v2, "deepseek_v2"),
    "UnlimitedOcrTextMoe": (_deepseek_v2, "deepseek_v2"),
    "DeepseekV3MoE": (_deepseek_v3, "deepseek_v3"),
    "Dots1MoE": (_deepseek_v3, "deepseek_v3"),
    "KimiLinearMoE": (_deepseek_v3, "deepseek_v3"),
    "BailingHybridMoE": (_deepseek_v3, "deepseek_v3"),
}


def supported_classes() -> list[str]:
    """Names of the transformers block classes :func:`from_hf_block` converts."""
    return sorted(_CONVERTERS)


def state_dict_adapter(block: nn.Module | str) -> StateDictAdapter:
    """The :class:`StateDictAdapter` (moeflow <-> transformers keys and layouts) of a
    transformers MoE block, given the block or its class name.

    Raises:
        UnsupportedModelError: not a class :func:`supported_classes` lists.
    """
    name = block if isinstance(block, str) else type(block).__name__
    if name not in _CONVERTERS:
        raise UnsupportedModelError(
            f"{name} is not a supported transformers MoE block; supported: "
            f"{', '.join(supported_classes())}"
        )
    return ADAPTERS[_CONVERTERS[name][1]]


# --------------------------------------------------------------------------- conversion
def _copy_(dst: nn.Parameter | torch.Tensor, src: torch.Tensor) -> None:
    """Make ``dst`` hold a copy of ``src`` with src's dtype and device."""
    dst.data = src.detach().clone()


def _jitter_input(jitter: float, layer: nn.Module, args: tuple):
    """Forward pre-hook: Mixtral's router jitter. In training mode the block input is scaled by
    ``U(1 - j, 1 + j)`` noise, drawn as transformers draws it (one ``uniform_`` over a tensor
    like the input), so the same seed gives the same noise; eval mode is the identity."""
    if not layer.training:
        return None
    x = args[0]
    return (x * torch.empty_like(x).uniform_(1.0 - jitter, 1.0 + jitter), *args[1:])


@torch.no_grad()
def from_hf_block(block: nn.Module, *, kernel: str = "auto") -> MoELayer:
    """Build a :class:`MoELayer` that computes what the transformers MoE ``block`` computes.

    Weights are copied (not shared); every tensor keeps its dtype and device, and the layer is
    put in the block's train/eval mode. ``kernel`` picks the expert kernel (``MoEConfig.kernel``).
    Mixtral's ``router_jitter_noise`` becomes a forward pre-hook on the layer (training only).

    Raises:
        UnsupportedModelError: the block's class is not one moeflow reproduces exactly.
    """
    adapter = state_dict_adapter(block)
    conv = _CONVERTERS[type(block).__name__][0]
    plan = conv(block)
    hf_keys = set(block.state_dict())
    if hf_keys != set(adapter.hf_keys()):
        raise _fail(
            block,
            f"its weights {sorted(hf_keys)} are not the {adapter.family} "
            f"layout {sorted(adapter.hf_keys())}",
        )
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
    if plan.jitter_noise > 0:
        layer.router_jitter_noise = plan.jitter_noise
        layer.register_forward_pre_hook(functools.partial(_jitter_input, plan.jitter_noise))
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


def _emit_router_logits(tap: nn.Module, router: nn.Module, inputs, routing) -> None:
    """Forward hook on our router: pass the logits (in the activation dtype) to the tap."""
    tap(routing.logits_TE.to(inputs[0].dtype))


class _LinkedView:
    """Mixin of the modules of a :func:`_build_view`: the attributes named in
    ``_moeflow_links`` read the moeflow layer's tensors at access time (so they follow
    ``.to()``, ``to_empty()`` or any later replacement of the layer's parameters)."""

    def __getattr__(self, name: str):
        links = self.__dict__.get("_moeflow_links")
        if links is not None and name in links:
            key, part, parts = links[name]
            mod_path, _, attr = key.rpartition(".")
            t = getattr(self.__dict__["_moeflow_layer"].get_submodule(mod_path), attr)
            return t if parts == 1 else t.chunk(parts, dim=0)[part]
        return super().__getattr__(name)

    def __reduce_ex__(self, protocol):
        # the view classes are made at run time: rebuild them from the transformers class
        return (_new_view, (self.__dict__["_moeflow_hf_class"],), self.__dict__)


_VIEW_CLASSES: dict[type, type] = {}


def _new_view(hf_cls: type) -> nn.Module:
    """An uninitialised instance of ``hf_cls``'s view class (a subclass, so ``isinstance``
    checks on ``hf_cls`` - transformers' output recorder and ``_init_weights`` - still hold)."""
    cls = _VIEW_CLASSES.get(hf_cls)
    if cls is None:
        cls = type(
            hf_cls.__name__,
            (_LinkedView, hf_cls),
            {"__module__": hf_cls.__module__, "__qualname__": hf_cls.__qualname__},
        )
        _VIEW_CLASSES[hf_cls] = cls
    return cls.__new__(cls)


class HFBlockView(nn.Module):
    """Container of the parameter-free replicas of a replaced transformers block's submodules
    (see :func:`patch_model`); not an instance of the block class, so code that looks for
    transformers MoE blocks does not find one inside a patched layer."""

    def __init__(self, block_class: str):
        super().__init__()
        self.block_class = block_class

    def extra_repr(self) -> str:
        return f"transformers view of {self.block_class} (no parameters of its own)"


def _build_view(block: nn.Module, layer: MoELayer, adapter: StateDictAdapter) -> nn.Module:
    """A parameter-free replica of the transformers ``block``'s submodules: same classes, same
    module tree, same plain attributes (sizes, config, transformers' ``_is_hf_initialized``
    flags), and every weight an alias of the layer's tensor (or of its part, for
    ``[gate; up]``) per ``adapter``.

    It owns no parameters or buffers (nothing is saved or moved twice). transformers'
    ``init_weights()`` visits it and initialises the aliased tensors in the block's order, with
    the block's init functions; its router is the tap that re-emits the router logits.
    """
    links: dict[str, dict[str, tuple[str, int, int]]] = {}
    for rule in adapter.rules:
        for i, theirs in enumerate(rule.theirs):
            mod_path, _, attr = theirs.rpartition(".")
            links.setdefault(mod_path, {})[attr] = (rule.ours, i, len(rule.theirs))

    def make(path: str, orig: nn.Module) -> nn.Module:
        view = _new_view(type(orig))
        nn.Module.__init__(view)
        for k, v in orig.__dict__.items():
            if k not in view.__dict__:
                view.__dict__[k] = v
        view.__dict__.update(
            _moeflow_links=links.get(path, {}), _moeflow_layer=layer, _moeflow_hf_class=type(orig)
        )
        # absent optional tensors (bias=None) stay visible as None
        for table in ("_parameters", "_buffers"):
            for name, t in getattr(orig, table).items():
                if t is None:
                    getattr(view, table)[name] = None
        add_children(view, path, orig)
        return view

    def add_children(view: nn.Module, path: str, orig: nn.Module) -> None:
        for name, child in orig.named_children():
            view.add_module(name, make(f"{path}.{name}" if path else name, child))

    root = HFBlockView(type(block).__name__)
    root._is_hf_initialized = getattr(block, "_is_hf_initialized", False)
    add_children(root, "", block)
    return root


def _router_path(block: nn.Module) -> str | None:
    for name in ("gate", "router"):
        if isinstance(getattr(block, name, None), nn.Module):
            return name
    return None


def _attach_view(layer: MoELayer, block: nn.Module, adapter: StateDictAdapter) -> str | None:
    """Give ``layer`` its transformers view (``layer.hf_view``) and make the view's router
    receive the router logits on every forward, so transformers' ``OutputRecorder`` (hooked on
    the router class) still sees them. Returns the tap's path inside the layer."""
    view = _build_view(block, layer, adapter)
    layer.hf_view = view
    view.train(layer.training)
    router_name = _router_path(block)
    if router_name is None:
        return None
    tap = view.get_submodule(router_name)
    tap.forward = _tap_forward
    layer.router.register_forward_hook(functools.partial(_emit_router_logits, tap))
    return f"hf_view.{router_name}"


def _state_dict_to_hf(layer: nn.Module, state_dict, prefix: str, local_metadata) -> None:
    adapter = layer.__dict__.get("hf_state_dict_adapter")
    if adapter is not None:  # None inside moeflow_state_dict_keys()
        adapter.to_hf_(state_dict, prefix)


def _load_state_dict_from_hf(layer: nn.Module, state_dict, prefix: str, *args) -> None:
    adapter = layer.__dict__.get("hf_state_dict_adapter")
    if adapter is not None:
        adapter.from_hf_(state_dict, prefix)


@contextlib.contextmanager
def moeflow_state_dict_keys(model: nn.Module):
    """Within this block a patched model's ``state_dict()`` uses moeflow's names (the
    parameters' own paths, ``...mlp.experts.w_in``), as tools that map state-dict keys back to
    parameters need (``torch.distributed.checkpoint``); ``load_state_dict`` takes either naming
    in both modes."""
    saved = [
        (m, m.__dict__["hf_state_dict_adapter"])
        for m in model.modules()
        if m.__dict__.get("hf_state_dict_adapter") is not None
    ]
    for m, _ in saved:
        m.hf_state_dict_adapter = None
    try:
        yield model
    finally:
        for m, adapter in saved:
            m.hf_state_dict_adapter = adapter


_PLAN_ATTRS = ("_tp_plan", "_ep_plan", "_pp_plan")
_CONFIG_PLANS = ("base_model_tp_plan", "base_model_pp_plan")


def _pattern(p: str) -> re.Pattern:
    """A transformers plan key (``layers.*.mlp.experts``) as a regex over module paths."""
    return re.compile(r"[^.]+".join(re.escape(part) for part in p.split("*")))


def _prune_plans(model: nn.Module, replaced: list[tuple[str, list[str]]]) -> None:
    """Drop the parallelism-plan entries that name a replaced block or anything inside it.

    ``replaced`` holds each replaced block's path (in ``model``) and the paths of its modules,
    parameters and buffers (relative to the block). Plans live on every transformers model
    inside ``model`` (``_tp_plan``, ``_ep_plan``, ``_pp_plan``, keyed from that model) and on
    its config (``base_model_tp_plan``, ``base_model_pp_plan``, keyed from the base model).
    ``config.base_model_ep_plan`` is left alone: config.json saves it, so a change would leak
    into the saved model's unpatched reloads; transformers reads the model's ``_ep_plan``.
    Which plan names a block's modules depends on the transformers version (5.24 lists routed
    experts in the TP and EP plans, 5.25 in the EP plan only); each plan is pruned by what it
    names. FSDP plans (``_fsdp_plan``) are left alone: FSDP wraps any module, moeflow's too.
    """
    try:
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return

    def gone(paths: list[str], key: str) -> bool:
        rx = _pattern(key)
        return any(rx.fullmatch(p) for p in paths)

    def prune(plan, paths):
        if not isinstance(plan, dict) or not plan:
            return plan
        return {k: v for k, v in plan.items() if not gone(paths, k)}

    for owner_path, owner in model.named_modules():
        if not isinstance(owner, PreTrainedModel):
            continue
        start = f"{owner_path}." if owner_path else ""
        paths = [
            f"{bp[len(start) :]}{'.' + q if q else ''}"
            for bp, inner in replaced
            if bp.startswith(start)
            for q in inner
        ]
        if not paths:
            continue
        for attr in _PLAN_ATTRS:
            plan = getattr(owner, attr, None)
            if isinstance(plan, dict) and plan:
                setattr(owner, attr, prune(plan, paths))
        base = getattr(owner, "base_model", owner)
        config = getattr(owner, "config", None)
        if base is owner and config is not None:
            for attr in _CONFIG_PLANS:
                plan = getattr(config, attr, None)
                if isinstance(plan, dict) and plan:
                    setattr(config, attr, prune(plan, paths))


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
    hooked = [
        (p, m)
        for p, m in model.named_modules()
        if isinstance(m, PreTrainedModel) and getattr(m, "_output_capturing_hooks_installed", False)
    ]
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
        rel = tap_path[len(owner_path) + 1 :] if owner_path else tap_path
        oc.recursively_install_hooks(tap, rel, tasks)


def _find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """MoE blocks, outermost first; the insides of a block are not searched."""
    found: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, mod: nn.Module) -> None:
        for name, child in mod.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if is_moe_block(child):
                found.append((path, child))
            elif not isinstance(child, MoELayer):  # already patched
                walk(path, child)

    if is_moe_block(model):
        return [("", model)]
    walk("", model)
    return found


def patch_model(model: nn.Module, *, kernel: str = "auto") -> nn.Module:
    """Replace every supported transformers MoE block of ``model`` with a :class:`MoELayer`.

    All blocks are checked before anything changes: if any MoE block is unsupported,
    :class:`UnsupportedModelError` names its class and the model is left untouched. Non-MoE
    modules are never touched. Returns ``model``; the :class:`PatchSummary` of what was
    replaced is also stored as ``model.moeflow_patch_summary``.

    The patched model still looks like the transformers model from outside:

    * ``state_dict()`` (so ``save_pretrained``) gives transformers' key names and layouts, and
      ``load_state_dict`` accepts them, through each layer's
      :class:`~moeflow.checkpoint.hf_keys.StateDictAdapter` (``layer.hf_state_dict_adapter``);
      parameters keep moeflow's names (``named_parameters``, optimizers), and
      :func:`moeflow_state_dict_keys` gives a state dict in those names.
    * ``layer.hf_view`` is a parameter-free replica of the replaced block whose weights alias the
      layer's: transformers' ``init_weights()`` initialises the layer through it exactly as it
      would the block (same functions, order and ``_is_hf_initialized`` flags), and its router
      re-emits the router logits, so ``output_router_logits=True`` and transformers'
      load-balancing loss keep working.
    * ``_tp_plan`` / ``_ep_plan`` / ``_pp_plan`` and the config's ``base_model_tp_plan`` lose the
      entries that named the replaced modules (tensor- and expert-parallel styles for
      transformers' expert tensors do not apply to moeflow's layer).
    """
    blocks = _find_blocks(model)
    if blocks and blocks[0][0] == "":
        raise UnsupportedModelError(
            f"patch_model expects a model that contains MoE blocks; got the block "
            f"{type(model).__name__} itself (use from_hf_block)"
        )
    layers = [(path, block, from_hf_block(block, kernel=kernel)) for path, block in blocks]
    summary = PatchSummary()
    taps = []
    replaced = []
    for path, block, layer in layers:
        adapter = state_dict_adapter(block)
        tap = _attach_view(layer, block, adapter)
        if tap is not None:
            taps.append((f"{path}.{tap}", layer.get_submodule(tap)))
        layer.hf_state_dict_adapter = adapter
        layer.register_state_dict_post_hook(_state_dict_to_hf)
        layer.register_load_state_dict_pre_hook(_load_state_dict_from_hf)
        inner = (
            [n for n, _ in block.named_modules()]
            + list(block.state_dict())
            + [n for n, _ in block.named_parameters()]
        )
        replaced.append((path, inner))
        parent_path, _, attr = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        setattr(parent, attr, layer)
        summary.replaced.append((path, type(block).__name__))
    _hook_taps(model, taps)
    _prune_plans(model, replaced)
    model.moeflow_patch_summary = summary
    return model
