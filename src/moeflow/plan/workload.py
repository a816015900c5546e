"""`LayerWorkload`: the sizes of one MoE layer on one GPU, and its per-pass costs.

Notation (FSMoE, ASPLOS'25): B batch per GPU, L sequence length, M hidden size, H expert FFN size,
E experts, k top-k, f capacity factor (``None`` = dropless), N_EP / N_ESP / N_DP degrees.

Message and work sizes (FSMoE, ASPLOS'25: per-chunk sizes of the overlapped a2a, ag/rs and
expert GEMMs), for the whole pass before chunking:
  * a2a bytes per GPU:   ``k f B L M b / N_ESP``
  * ag = rs bytes:       ``k f B L M b`` (only when N_ESP > 1)
  * expert GEMM FLOPs:   ``2 k f B L M H / N_ESP * n_gemm`` (n_gemm = 2 for a plain GPT FFN,
    3 for Mixtral's SwiGLU); backward doubles it (FSMoE: "Backward doubles the expert GEMM work").

Our choices where the paper is silent: FSMoE writes ``f B L M``; we multiply by ``k``
because a token routed to k experts is sent k times (capacity is ``k f B L / E`` per expert).
Dropless layers use ``f = 1`` (the balanced expected load). ``b`` is bytes per element (2).
The data-parallel gradient of a layer is its attention and gate weights,
``(4 M^2 + M E) b`` bytes (experts are sharded by EP x ESP, so they are not all-reduced).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from moeflow.config import dataclass_from_dict
from moeflow.errors import ConfigError
from moeflow.perf.cost import PerfModel
from moeflow.perf.layer import PassCost
from moeflow.validate import positive_int

FFN_TYPES = ("simple", "mixtral")


@dataclass(frozen=True, kw_only=True)
class LayerWorkload:
    B: int
    L: int
    M: int
    H: int
    E: int
    k: int = 2
    f: float | None = 1.2
    ffn: str = "simple"
    heads: int = 16
    n_ep: int = 1
    n_esp: int = 1
    n_dp: int = 1
    bytes_per_element: int = 2

    def __post_init__(self) -> None:
        for name in (
            "B",
            "L",
            "M",
            "H",
            "E",
            "k",
            "heads",
            "n_ep",
            "n_esp",
            "n_dp",
            "bytes_per_element",
        ):
            object.__setattr__(
                self, name, positive_int(f"LayerWorkload.{name}", getattr(self, name))
            )
        if self.f is not None and not (isinstance(self.f, (int, float)) and self.f > 0):
            raise ConfigError("LayerWorkload.f", self.f, "None (dropless) or a float > 0")
        if self.ffn not in FFN_TYPES:
            raise ConfigError("LayerWorkload.ffn", self.ffn, f"one of {FFN_TYPES}")
        if self.k > self.E:
            raise ConfigError("LayerWorkload.k", self.k, f"at most E={self.E}")

    # ---- sizes ----------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self.B * self.L

    @property
    def load_factor(self) -> float:
        return 1.0 if self.f is None else float(self.f)

    @property
    def routed_tokens(self) -> float:
        return self.k * self.load_factor * self.tokens

    @property
    def n_gemm(self) -> int:
        return 3 if self.ffn == "mixtral" else 2

    @property
    def a2a_bytes(self) -> float:
        return self.routed_tokens * self.M * self.bytes_per_element / self.n_esp

    @property
    def ag_bytes(self) -> float:
        return self.routed_tokens * self.M * self.bytes_per_element if self.n_esp > 1 else 0.0

    @property
    def expert_flops(self) -> float:
        return 2.0 * self.routed_tokens * self.M * self.H / self.n_esp * self.n_gemm

    @property
    def attention_flops(self) -> float:
        """Forward attention FLOPs: QKV+O projections and the two score GEMMs."""
        return 2.0 * self.tokens * 4 * self.M * self.M + 4.0 * self.B * self.L * self.L * self.M

    @property
    def grad_bytes(self) -> float:
        return (4 * self.M * self.M + self.M * self.E) * self.bytes_per_element

    def pass_cost(self, perf: PerfModel, backward: bool = False) -> PassCost:
        """alpha/work of each task kind (see :class:`moeflow.perf.layer.PassCost`).

        The expert task is priced by ``expert_fwd@<dtype>`` / ``expert_bwd@<dtype>`` (n =
        forward expert FLOPs) when ``perf`` has them (``moeflow profile`` measures the
        expert FFN kernel), else by ``gemm`` (backward: twice the forward GEMMs)."""
        a2a = perf.cost("a2a")
        mult = 2.0 if backward else 1.0
        expert = f"expert_{'bwd' if backward else 'fwd'}@{self.dtype}"
        if expert in perf.costs:  # the expert FFN kernel itself, profiled per dtype
            gemm, mult = perf.costs[expert], 1.0
        else:  # square matmuls; backward is two GEMMs per forward GEMM
            gemm = perf.cost("gemm")
        if self.n_esp > 1:
            ag, rs = perf.cost("ag"), perf.cost("rs")
            alpha_ag, work_ag = ag.alpha, ag.beta * self.ag_bytes
            alpha_rs, work_rs = rs.alpha, rs.beta * self.ag_bytes
        else:
            alpha_ag = work_ag = alpha_rs = work_rs = 0.0
        return PassCost(
            alpha_a2a=a2a.alpha,
            work_a2a=a2a.beta * self.a2a_bytes,
            alpha_ag=alpha_ag,
            work_ag=work_ag,
            alpha_rs=alpha_rs,
            work_rs=work_rs,
            alpha_exp=gemm.alpha * mult,
            work_exp=gemm.beta * self.expert_flops * mult,
        )

    @property
    def dtype(self) -> str:
        """The compute dtype the profiled expert costs are keyed by (4 bytes: float32, 2:
        bfloat16)."""
        return {4: "float32", 2: "bfloat16"}.get(self.bytes_per_element, "bfloat16")

    # ---- construction / JSON -------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        moe_config,
        *,
        tokens: int,
        seq_len: int | None = None,
        heads: int | None = None,
        n_ep: int = 1,
        n_esp: int = 1,
        n_dp: int = 1,
        bytes_per_element: int = 2,
    ) -> LayerWorkload:
        """Build from a :class:`moeflow.config.MoEConfig` (or a ``ModelPreset``).

        ``tokens`` is the number of tokens per GPU per step (``B * L``); ``seq_len`` defaults
        to ``min(tokens, 4096)`` and ``B = ceil(tokens / seq_len)``.
        """
        preset_heads = getattr(moe_config, "num_attention_heads", None)
        cfg = getattr(moe_config, "moe", moe_config)
        positive_int("LayerWorkload.tokens", tokens)
        L = seq_len or min(tokens, 4096)
        B = max(1, math.ceil(tokens / L))
        return cls(
            B=B,
            L=L,
            M=cfg.hidden_size,
            H=cfg.ffn_hidden_size,
            E=cfg.num_experts,
            k=cfg.top_k,
            f=cfg.capacity_factor,
            ffn="mixtral" if cfg.expert_type == "swiglu" else "simple",
            heads=heads or preset_heads or 16,
            n_ep=n_ep,
            n_esp=n_esp,
            n_dp=n_dp,
            bytes_per_element=bytes_per_element,
        )

    def replace(self, **changes) -> LayerWorkload:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> LayerWorkload:
        return dataclass_from_dict(cls, d)


def fsmoe_sweep(
    *, n_ep: int, n_esp: int, n_dp: int = 1, k: int = 2, E: int | None = None
) -> list[LayerWorkload]:
    """FSMoE's layer sweep, 3^6 x 2 = 1458 layers (FSMoE, ASPLOS'25, evaluation).

    B in {1,2,4}, heads in {8,16,32}, L in {512,1024,2048}, M in {1024,2048,4096},
    H/M in {2,3,4}, f in {1.2, 2.4, dropless}, FFN in {simple, mixtral}. E defaults to one
    expert per EP rank (``n_ep``).
    """
    out = []
    for B in (1, 2, 4):
        for heads in (8, 16, 32):
            for L in (512, 1024, 2048):
                for M in (1024, 2048, 4096):
                    for hm in (2, 3, 4):
                        for f in (1.2, 2.4, None):
                            for ffn in FFN_TYPES:
                                out.append(
                                    LayerWorkload(
                                        B=B,
                                        L=L,
                                        M=M,
                                        H=hm * M,
                                        E=E or max(n_ep, k),
                                        k=k,
                                        f=f,
                                        ffn=ffn,
                                        heads=heads,
                                        n_ep=n_ep,
                                        n_esp=n_esp,
                                        n_dp=n_dp,
                                    )
                                )
    return out
