"""Configuration: `MoEConfig` for one MoE layer and `ModelPreset` for published model shapes.

This module imports no torch, so planners and the simulator can use the presets on a laptop.
Every config is a frozen dataclass that validates itself in ``__post_init__`` and raises
:class:`moeflow.errors.ConfigError` naming the bad field and what is allowed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moeflow.errors import ConfigError
from moeflow.validate import nonnegative_int, positive_int

ROUTERS = ("softmax_topk", "switch", "sigmoid", "xmoe", "expert_choice", "deepseek")
EXPERT_TYPES = ("swiglu", "gelu")
# silu = swish; gelu = exact (erf) GELU; gelu_tanh = GELU's tanh approximation (GPT-2)
EXPERT_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")
SCORE_FUNCS = ("softmax", "sigmoid")
KERNELS = ("auto", "grouped_mm", "bmm", "loop")
SHARED_GATES = ("none", "sigmoid")
ROUTER_DTYPES = ("float32", "input")


def _require(cond: bool, name: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(name, value, allowed)


def dataclass_from_dict(cls, d: dict):
    """Build dataclass ``cls`` from ``d``; unknown keys raise a ConfigError naming them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(cls.__name__, unknown, f"known fields are {sorted(names)}")
    return cls(**d)


@dataclass(frozen=True, kw_only=True)
class MoEConfig:
    """One MoE layer.

    Shapes: D = ``hidden_size``, F = ``ffn_hidden_size``, E = ``num_experts``, K = ``top_k``.

    Router options (``router``):
      * ``softmax_topk`` - GShard / Mixtral / Qwen3. ``noisy_gating`` adds GShard's
        ``N(0,1)*softplus(x W_noise)`` during training; ``norm_topk_prob`` renormalises the
        k kept probabilities (Mixtral and Qwen3 do, GShard with k=1 does not).
      * ``switch`` - top-1 softmax (Switch Transformer); usually with a ``capacity_factor``.
      * ``sigmoid`` - top-k by logit, each expert output scaled by ``sigmoid(logit)``
        (BASE / StableMoE-style output scaling).
      * ``xmoe`` - X-MoE: cosine between a ``xmoe_dim``-dimensional projection of x and
        learned expert embeddings, divided by a learned temperature.
      * ``expert_choice`` - each expert picks its top ``capacity`` tokens.
      * ``deepseek`` - DeepSeek V2/V3 group-limited top-k with ``n_group``/``topk_group``,
        ``score_func`` softmax (V2) or sigmoid (V3), the aux-loss-free correction bias
        (``correction_bias``) and ``routed_scaling_factor``.

    Experts: ``expert_type="swiglu"`` is gated, ``act(x W_gate) * (x W_up)`` (SwiGLU with the
    default SiLU, GeGLU with GELU), ``"gelu"`` is a plain MLP ``act(x W_in)``; ``activation``
    picks ``act`` (one of ``EXPERT_ACTIVATIONS``; None = SiLU for gated, tanh-GELU for plain).

    Router precision: ``router_dtype="float32"`` (default) computes the router logits in fp32,
    so routing decisions do not depend on the activation dtype. ``"input"`` computes them in the
    activation dtype and only the softmax in fp32, exactly as transformers' Mixtral and Qwen
    blocks do; use it to reproduce those blocks bit for bit in bf16.

    Capacity: ``capacity_factor=None`` is dropless (default). Otherwise each expert keeps at
    most ``ceil(capacity_factor * T * K / E)`` tokens (FSMoE: ``k*f*B*L/E``); later tokens
    in token order are dropped (their contribution is zero, the residual is up to the caller).
    """

    hidden_size: int
    ffn_hidden_size: int
    num_experts: int
    top_k: int = 2
    router: str = "softmax_topk"
    expert_type: str = "swiglu"
    activation: str | None = None
    capacity_factor: float | None = None
    norm_topk_prob: bool = True
    noisy_gating: bool = False
    router_bias: bool = False
    router_dtype: str = "float32"
    # DeepSeek
    n_group: int = 1
    topk_group: int = 1
    score_func: str = "softmax"
    routed_scaling_factor: float = 1.0
    correction_bias: bool = False
    # X-MoE
    xmoe_dim: int = 16
    # shared experts
    num_shared_experts: int = 0
    shared_ffn_hidden_size: int | None = None
    shared_expert_gate: str = "none"
    # losses
    aux_loss_coef: float = 0.0
    z_loss_coef: float = 0.0
    # compute
    kernel: str = "auto"

    def __post_init__(self) -> None:
        # integer fields are stored as plain ints (numpy integers are accepted and converted)
        def store(name: str, value) -> None:
            object.__setattr__(self, name, value)

        for name in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k"):
            store(name, positive_int(name, getattr(self, name)))
        _require(self.router in ROUTERS, "router", self.router, f"one of {ROUTERS}")
        _require(
            self.expert_type in EXPERT_TYPES,
            "expert_type",
            self.expert_type,
            f"one of {EXPERT_TYPES}",
        )
        if self.activation is not None:
            _require(
                self.activation in EXPERT_ACTIVATIONS,
                "activation",
                self.activation,
                f"None or one of {EXPERT_ACTIVATIONS}",
            )
        _require(
            self.top_k <= self.num_experts,
            "top_k",
            self.top_k,
            f"at most num_experts={self.num_experts}",
        )
        if self.router == "switch":
            _require(self.top_k == 1, "top_k", self.top_k, "1 for router='switch'")
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            _require(
                isinstance(cf, (int, float)) and not isinstance(cf, bool) and cf > 0,
                "capacity_factor",
                cf,
                "None (dropless) or a float > 0",
            )
        _require(
            self.router_dtype in ROUTER_DTYPES,
            "router_dtype",
            self.router_dtype,
            f"one of {ROUTER_DTYPES}",
        )
        store("n_group", positive_int("n_group", self.n_group))
        _require(
            self.num_experts % self.n_group == 0,
            "n_group",
            self.n_group,
            f"a divisor of num_experts={self.num_experts}",
        )
        store(
            "topk_group",
            positive_int(
                "topk_group", self.topk_group, maximum=self.n_group, maximum_name="n_group"
            ),
        )
        if self.router == "deepseek":
            experts_reachable = self.topk_group * (self.num_experts // self.n_group)
            _require(
                self.top_k <= experts_reachable,
                "top_k",
                self.top_k,
                f"at most topk_group*num_experts/n_group={experts_reachable}",
            )
        _require(
            self.score_func in SCORE_FUNCS, "score_func", self.score_func, f"one of {SCORE_FUNCS}"
        )
        _require(
            self.routed_scaling_factor > 0,
            "routed_scaling_factor",
            self.routed_scaling_factor,
            "a float > 0",
        )
        store("xmoe_dim", positive_int("xmoe_dim", self.xmoe_dim))
        store("num_shared_experts", nonnegative_int("num_shared_experts", self.num_shared_experts))
        store(
            "shared_ffn_hidden_size",
            positive_int("shared_ffn_hidden_size", self.shared_ffn_hidden_size, allow_none=True),
        )
        _require(
            self.shared_expert_gate in SHARED_GATES,
            "shared_expert_gate",
            self.shared_expert_gate,
            f"one of {SHARED_GATES}",
        )
        for name in ("aux_loss_coef", "z_loss_coef"):
            v = getattr(self, name)
            _require(isinstance(v, (int, float)) and v >= 0, name, v, "a float >= 0")
        _require(self.kernel in KERNELS, "kernel", self.kernel, f"one of {KERNELS}")

    @property
    def expert_activation(self) -> str:
        """The experts' activation: ``activation``, or by default SiLU for ``swiglu`` (gated)
        and tanh-GELU for ``gelu`` (plain) experts."""
        if self.activation is not None:
            return self.activation
        return "silu" if self.expert_type == "swiglu" else "gelu_tanh"

    @property
    def shared_ffn_size(self) -> int:
        """FFN width of the fused shared-expert block: all shared experts side by side."""
        per = self.shared_ffn_hidden_size or self.ffn_hidden_size
        return per * self.num_shared_experts

    def replace(self, **changes) -> MoEConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MoEConfig:
        return dataclass_from_dict(cls, d)

    @classmethod
    def preset(cls, name: str) -> MoEConfig:
        return model_preset(name).moe


@dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """A published model shape: the MoE layer plus what planners need around it."""

    name: str
    num_layers: int
    num_attention_heads: int
    vocab_size: int
    moe: MoEConfig
    source: str = ""
    notes: str = ""

    @property
    def hidden_size(self) -> int:
        return self.moe.hidden_size


_PRESETS: dict[str, ModelPreset] = {}


def _add(p: ModelPreset) -> None:
    _PRESETS[p.name] = p


_add(
    ModelPreset(
        name="mixtral-8x7b",
        num_layers=32,
        num_attention_heads=32,
        vocab_size=32000,
        moe=MoEConfig(
            hidden_size=4096,
            ffn_hidden_size=14336,
            num_experts=8,
            top_k=2,
            router="softmax_topk",
            norm_topk_prob=True,
            aux_loss_coef=0.02,
        ),
        source="mistralai/Mixtral-8x7B-v0.1 config.json",
    )
)
_add(
    ModelPreset(
        name="mixtral-8x22b",
        num_layers=56,
        num_attention_heads=48,
        vocab_size=32768,
        moe=MoEConfig(
            hidden_size=6144,
            ffn_hidden_size=16384,
            num_experts=8,
            top_k=2,
            router="softmax_topk",
            norm_topk_prob=True,
            aux_loss_coef=0.001,
        ),
        source="mistralai/Mixtral-8x22B-v0.1 config.json",
    )
)
_add(
    ModelPreset(
        name="qwen3-30b-a3b",
        num_layers=48,
        num_attention_heads=32,
        vocab_size=151936,
        moe=MoEConfig(
            hidden_size=2048,
            ffn_hidden_size=768,
            num_experts=128,
            top_k=8,
            router="softmax_topk",
            norm_topk_prob=True,
            aux_loss_coef=0.001,
        ),
        source="Qwen/Qwen3-30B-A3B config.json",
    )
)
_add(
    ModelPreset(
        name="qwen3-235b-a22b",
        num_layers=94,
        num_attention_heads=64,
        vocab_size=151936,
        moe=MoEConfig(
            hidden_size=4096,
            ffn_hidden_size=1536,
            num_experts=128,
            top_k=8,
            router="softmax_topk",
            norm_topk_prob=True,
            aux_loss_coef=0.001,
        ),
        source="Qwen/Qwen3-235B-A22B config.json",
    )
)
_add(
    ModelPreset(
        name="deepseek-v2",
        num_layers=60,
        num_attention_heads=128,
        vocab_size=102400,
        moe=MoEConfig(
            hidden_size=5120,
            ffn_hidden_size=1536,
            num_experts=160,
            top_k=6,
            router="deepseek",
            score_func="softmax",
            n_group=8,
            topk_group=3,
            routed_scaling_factor=16.0,
            norm_topk_prob=False,
            num_shared_experts=2,
            shared_ffn_hidden_size=None,
            aux_loss_coef=0.003,
        ),
        source="deepseek-ai/DeepSeek-V2 config.json (first_k_dense_replace=1 not modelled)",
    )
)
_add(
    ModelPreset(
        name="deepseek-v3",
        num_layers=61,
        num_attention_heads=128,
        vocab_size=129280,
        moe=MoEConfig(
            hidden_size=7168,
            ffn_hidden_size=2048,
            num_experts=256,
            top_k=8,
            router="deepseek",
            score_func="sigmoid",
            n_group=8,
            topk_group=4,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            correction_bias=True,
            num_shared_experts=1,
        ),
        source="deepseek-ai/DeepSeek-V3 config.json (first_k_dense_replace=3 not modelled)",
    )
)
_add(
    ModelPreset(
        name="gpt2-xl-moe",
        num_layers=48,
        num_attention_heads=25,
        vocab_size=50257,
        moe=MoEConfig(
            hidden_size=1600,
            ffn_hidden_size=6400,
            num_experts=48,
            top_k=2,
            router="softmax_topk",
            expert_type="gelu",
            norm_topk_prob=False,
            capacity_factor=1.2,
            aux_loss_coef=0.01,
        ),
        source="GPT-2 XL (D=1600, 48 layers, 25 heads, F=4D) with every FFN an MoE layer",
        notes="FSMoE's GPT2-XL MoE: one expert per GPU of its 48-GPU testbed A and GShard top-2 "
        "with f=1.2 are our reading; the expert count is not stated in the reachable text.",
    )
)


def preset_names() -> list[str]:
    return sorted(_PRESETS)


def model_preset(name: str) -> ModelPreset:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ConfigError("preset", name, f"one of {preset_names()}") from None
