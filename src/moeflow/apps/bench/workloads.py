"""What ``moeflow bench`` runs: a model, a batch, one training or decode step, and a setting.

Shape legend: B sequences, L sequence length (context), T = B*L tokens, D hidden, V vocabulary.

Three model sources share one :class:`Workload`:

* ``demo``    - :mod:`moeflow.models.demo`'s byte-level LM (its attention is inline in ``Block``);
* ``decoder`` - :class:`moeflow.models.MoEDecoder`, fresh at the demo's shape or loaded from a
  transformers checkpoint directory (``path``), decode steps run on its KV cache;
* ``hf``      - a transformers ``AutoModelForCausalLM`` directory whose MoE blocks
  :func:`moeflow.patch_model` replaces, decode steps on transformers' ``DynamicCache``.

A training step is forward, loss (cross-entropy plus the MoE layers' auxiliary losses),
backward and an AdamW step. A decode step is one new token per sequence after an
``L``-token context: with a KV cache for ``decoder`` and ``hf``, a full forward over the
window for ``demo`` (its ``generate`` works that way).

A :class:`Setting` is applied when the workload is built: the expert kernel on every
:class:`moeflow.MoELayer`, the parameter dtype, activation recomputation of every transformer
block (``torch.utils.checkpoint``, non-reentrant) and ``torch.compile`` of every timed module
(so the module hooks stay outside the compiled code and the breakdown keeps its rows).
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from moeflow.apps.bench.matrix import FINETUNES, QUANTS, SDPA_BACKENDS
from moeflow.errors import ConfigError, InputError, UnsupportedModelError
from moeflow.layer.moe import MoELayer

MODELS = ("demo", "decoder", "hf")
BENCH_KERNELS = ("grouped_mm", "bmm", "loop")
DTYPES = ("float32", "bfloat16")
MODES = ("train", "decode")

#: rows of the breakdown, in the order a forward pass meets them
CATEGORIES = (
    "embedding",
    "attention",
    "norm",
    "moe_router",
    "moe_experts",
    "moe_other",
    "lm_head",
    "loss",
    "optimizer",
    "other",
)
MOE_CATEGORIES = ("moe_router", "moe_experts", "moe_other")


@dataclass(frozen=True, kw_only=True)
class Setting:
    """One column of the comparison: expert kernel, dtype, recomputation, torch.compile, and
    the factors of :mod:`moeflow.apps.bench.matrix`: LoRA fine-tuning (train), ZeRO-3 through
    FSDP2 (train), weight-only int8 (decode) and the SDPA back-end."""

    kernel: str = "grouped_mm"
    dtype: str = "float32"
    recompute: bool = False
    compile: bool = False
    finetune: str = "full"
    zero3: bool = False
    quant: str = "none"
    sdpa: str = "default"

    def __post_init__(self) -> None:
        if self.kernel not in BENCH_KERNELS:
            raise ConfigError("kernel", self.kernel, f"one of {BENCH_KERNELS}")
        if self.dtype not in DTYPES:
            raise ConfigError("dtype", self.dtype, f"one of {DTYPES}")
        if self.finetune not in FINETUNES:
            raise ConfigError("finetune", self.finetune, f"one of {FINETUNES}")
        if self.quant not in QUANTS:
            raise ConfigError("quant", self.quant, f"one of {QUANTS}")
        if self.sdpa not in SDPA_BACKENDS:
            raise ConfigError("sdpa", self.sdpa, f"one of {SDPA_BACKENDS}")

    @property
    def matrix(self) -> bool:
        """Whether a factor of :mod:`moeflow.apps.bench.matrix` is off its default."""
        return (self.finetune, self.zero3, self.quant, self.sdpa) != (
            "full",
            False,
            "none",
            "default",
        )

    @property
    def label(self) -> str:
        dt = {"float32": "fp32", "bfloat16": "bf16"}[self.dtype]
        extra = (
            ("/lora" if self.finetune == "lora" else "")
            + ("/zero3" if self.zero3 else "")
            + ("/int8wo" if self.quant == "int8" else "")
            + (f"/sdpa-{self.sdpa}" if self.sdpa != "default" else "")
        )
        return (
            f"{self.kernel}/{dt}/rc-{'on' if self.recompute else 'off'}"
            f"/compile-{'on' if self.compile else 'off'}{extra}"
        )

    def check_mode(self, mode: str) -> None:
        """ConfigError for a factor the mode has no use for (LoRA and ZeRO-3 shape a training
        step, weight-only int8 a decode step)."""
        if mode != "train" and self.finetune != "full":
            raise ConfigError("finetune", self.finetune, "full in decode (LoRA trains)")
        if mode != "train" and self.zero3:
            raise ConfigError("zero3", "on", "off in decode (ZeRO-3 shards training state)")
        if mode != "decode" and self.quant != "none":
            raise ConfigError("quant", self.quant, "none in train (weight-only int8 serves)")

    def to_dict(self) -> dict:
        return {
            "kernel": self.kernel,
            "dtype": self.dtype,
            "recompute": self.recompute,
            "compile": self.compile,
            "finetune": self.finetune,
            "zero3": self.zero3,
            "quant": self.quant,
            "sdpa": self.sdpa,
            "label": self.label,
        }


@dataclass(frozen=True, kw_only=True)
class Shape:
    """The batch: ``batch`` sequences of ``seq_len`` tokens (decode: ``seq_len`` of context)."""

    batch: int = 8
    seq_len: int = 128


def _module_category(name: str, module: nn.Module, in_moe: bool) -> str | None:
    """The breakdown row of the ops a module runs itself (None: not timed on its own)."""
    cls = type(module).__name__
    if isinstance(module, MoELayer) or type(module).__name__ == "ExpertParallel":
        return "moe_other"
    if in_moe:
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "router":
            return "moe_router"
        if leaf in ("experts", "shared"):
            return "moe_experts"
        return None
    if isinstance(module, nn.Embedding):
        return "embedding"
    if "Norm" in cls:
        return "norm"
    if "Attention" in cls or cls in ("Rotary",) or "Rotary" in cls:
        return "attention"
    if cls == "Block":  # moeflow.models.demo.Block: SDPA and the residual adds run in Block itself
        return "attention"
    leaf = name.rsplit(".", 1)[-1]
    if isinstance(module, nn.Linear):
        if leaf in ("head", "lm_head"):
            return "lm_head"
        if leaf in ("qkv", "proj"):
            return "attention"
    return None


def timed_modules(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(name, module, category) of every module the dissection hooks, outermost first.

    Each op is charged to the innermost timed module it runs in; ops outside every timed
    module fall to ``other``. Inside an MoE layer only the router and the experts are split
    off (the rest of the layer, permute, combine, count exchange, is ``moe_other``).
    """
    out: list[tuple[str, nn.Module, str]] = []
    moe_prefixes: list[str] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        in_moe = any(name.startswith(p + ".") for p in moe_prefixes)
        if (
            in_moe
            and name.count(".")
            > max(p.count(".") for p in moe_prefixes if name.startswith(p + ".")) + 1
        ):
            continue  # deeper than a direct child of the MoE layer
        if in_moe and name.rsplit(".", 1)[-1] == "layer" and isinstance(mod, MoELayer):
            moe_prefixes.append(name)  # ExpertParallel.layer: its router is timed too
            continue
        cat = _module_category(name, mod, in_moe)
        if cat == "moe_other":
            moe_prefixes.append(name)
        if cat is not None:
            out.append((name, mod, cat))
    return out


def moe_layers(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if isinstance(m, MoELayer) or type(m).__name__ == "ExpertParallel"
    ]


def _block_list(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the longest ``nn.ModuleList`` of modules of one class."""
    best = None
    for mod in model.modules():
        if (
            isinstance(mod, nn.ModuleList)
            and len(mod)
            and len({type(m) for m in mod}) == 1
            and (best is None or len(mod) > len(best))
        ):
            best = mod
    if best is None:
        raise UnsupportedModelError(
            f"{type(model).__name__} has no list of transformer blocks to recompute"
        )
    return best


def _recompute(block: nn.Module) -> None:
    """Activation recomputation: the block keeps only its inputs, backward reruns it."""
    from torch.utils.checkpoint import checkpoint

    fwd = block.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fwd(*args, **kwargs)
        return checkpoint(fwd, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def _compile(model: nn.Module) -> None:
    """``torch.compile`` each timed module that runs no other timed module, and each attention
    module that holds no MoE layer (its q/k norms compile into it): the hooks of a compiled
    module stay outside the compiled code, so its row survives. Under compilation the experts
    take their traceable path (``Experts._forward_traceable``), whatever the kernel setting."""
    mods = timed_modules(model)
    names = [n for n, _, _ in mods]
    for name, mod, cat in mods:
        has_timed_child = any(o.startswith(name + ".") for o in names)
        holds_moe = any(isinstance(m, MoELayer) for m in mod.modules())
        if isinstance(mod, MoELayer) or holds_moe:
            continue  # the MoE layer's router and experts are compiled on their own
        if has_timed_child and cat != "attention":
            continue
        mod.forward = torch.compile(mod.forward, dynamic=True)


class Workload:
    """A model with its batch and step functions. Build with :func:`build_workload`."""

    def __init__(
        self,
        kind: str,
        model: nn.Module,
        vocab: int,
        shape: Shape,
        setting: Setting,
        mode: str,
        seed: int = 0,
        context: int | None = None,
    ):
        self.kind, self.model, self.vocab, self.shape = kind, model, vocab, shape
        self.setting, self.mode, self.seed = setting, mode, seed
        self.context = context
        setting.check_mode(mode)
        dtype = getattr(torch, setting.dtype)
        model.to(dtype)
        for m in moe_layers(model):
            layer = m.layer if hasattr(m, "layer") and isinstance(m.layer, MoELayer) else m
            layer.experts.kernel = setting.kernel
        from moeflow.apps.bench import matrix

        #: units each matrix factor applies to (adapted / quantized Linears, FSDP units,
        #: blocks under a forced SDPA back-end): what its prediction prices per unit
        self.units: dict = {}
        if setting.finetune == "lora":
            self.units["lora"] = len(matrix.lora_targets(model))
            matrix.apply_lora(model)
        if setting.quant == "int8":
            shapes = dict(model.named_modules())
            self.units["int8_weights"] = [
                tuple(shapes[n].weight.shape) for n in matrix.quant_targets(model)
            ]
            self.units["int8"] = matrix.apply_int8(model)
        if setting.sdpa != "default":
            blocks = _block_list(model)
            matrix.apply_sdpa(blocks, setting.sdpa, setting.dtype)
            self.units["sdpa"] = len(blocks)
        if setting.recompute and mode == "train":
            for blk in _block_list(model):
                _recompute(blk)
        if setting.zero3:
            self.units["zero3"] = matrix.apply_zero3(model, _block_list(model))
        if setting.compile:
            _compile(model)
        g = torch.Generator().manual_seed(seed)
        B, L = shape.batch, shape.seq_len
        self.ids_BL = torch.randint(0, vocab, (B, L), generator=g)
        self.targets_BL = torch.randint(0, vocab, (B, L), generator=g)
        self.next_B1 = torch.randint(0, vocab, (B, 1), generator=g)
        self.opt = None
        self._cache = None
        if mode == "train":
            model.train()
            # the trainable parameters only (all but the frozen base weights under LoRA)
            self.opt = torch.optim.AdamW(
                [p for p in model.parameters() if p.requires_grad], lr=1e-4
            )
        else:
            model.eval()
            self._prefill()

    # -- forward --------------------------------------------------------------------------
    def logits(self, ids_BL: torch.Tensor) -> torch.Tensor:
        out = self.model(ids_BL)
        return out.logits if hasattr(out, "logits") else out

    def loss(self, logits_BLV: torch.Tensor) -> torch.Tensor:
        """Cross-entropy plus every MoE layer's auxiliary loss (as ``moeflow demo`` trains)."""
        lm = F.cross_entropy(
            logits_BLV.float().reshape(-1, logits_BLV.shape[-1]), self.targets_BL.reshape(-1)
        )
        aux = sum(
            (
                m.aux_loss.float()
                for m in moe_layers(self.model)
                if isinstance(m.aux_loss, torch.Tensor)
            ),
            torch.zeros(()),
        )
        return lm + aux

    # -- decode ---------------------------------------------------------------------------
    def _prefill(self) -> None:
        with torch.no_grad():
            if self.kind == "decoder":
                L = self.shape.seq_len
                self._cache = self.model.new_cache(self.shape.batch, L + 1)
                self.model(self.ids_BL, self._cache)
            elif self.kind == "hf":
                out = self.model(self.ids_BL, use_cache=True)
                self._cache = getattr(out, "cache", None) or out.past_key_values

    def decode_forward(self) -> torch.Tensor:
        """One new token per sequence; the cache is reset to the prefill's before each call
        (outside the timed step) so every step decodes at the same context length."""
        B, L = self.shape.batch, self.shape.seq_len
        if self.kind == "decoder":
            start_B = torch.full((B,), L, dtype=torch.long)
            return self.model(self.next_B1, self._cache, None, start_B)
        if self.kind == "hf":
            # transformers 5.x names the cache argument ``cache`` (``past_key_values`` before)
            params = inspect.signature(self.model.forward).parameters
            key = "cache" if "cache" in params else "past_key_values"
            out = self.model(self.next_B1, use_cache=True, **{key: self._step_cache})
            return out.logits
        # demo: no KV cache; its generate runs the whole window for each new byte
        return self.model(self.ids_BL)[:, -1:]

    def before_step(self) -> None:
        """Untimed preparation of a step (a fresh copy of the prefill cache for ``hf``)."""
        if self.mode == "decode" and self.kind == "hf":
            self._step_cache = copy.deepcopy(self._cache)

    # -- counts for FLOPs -----------------------------------------------------------------
    @property
    def tokens(self) -> int:
        """Tokens whose forward a step computes (B*L for training, B for a cached decode)."""
        B, L = self.shape.batch, self.shape.seq_len
        if self.mode == "decode" and self.kind != "demo":
            return B
        return B * L


def _demo_model(shape: Shape, seed: int, dims: dict):
    from moeflow.models.demo import VOCAB, DemoModelConfig, build_demo_model

    cfg = DemoModelConfig(seq_len=shape.seq_len, **dims)
    return build_demo_model(cfg, seed=seed), VOCAB


def _decoder_model(shape: Shape, seed: int, dims: dict, path: str | None):
    from moeflow.checkpoint import load_pretrained
    from moeflow.config import MoEConfig
    from moeflow.models import DecoderConfig, MoEDecoder
    from moeflow.models.demo import VOCAB

    if path:
        model = load_pretrained(path)
        if shape.seq_len + 1 > model.cfg.max_position_embeddings:
            raise ConfigError(
                "seq_len",
                shape.seq_len,
                f"below max_position_embeddings={model.cfg.max_position_embeddings}",
            )
        return model, model.cfg.vocab_size
    d = {
        "dim": 128,
        "num_layers": 2,
        "num_heads": 4,
        "num_experts": 8,
        "top_k": 2,
        "ffn_hidden_size": 256,
        **dims,
    }
    moe = MoEConfig(
        hidden_size=d["dim"],
        ffn_hidden_size=d["ffn_hidden_size"],
        num_experts=d["num_experts"],
        top_k=d["top_k"],
        aux_loss_coef=0.01,
    )
    cfg = DecoderConfig(
        vocab_size=VOCAB,
        num_layers=d["num_layers"],
        num_heads=d["num_heads"],
        num_kv_heads=d["num_heads"],
        head_dim=d["dim"] // d["num_heads"],
        moe=moe,
        max_position_embeddings=shape.seq_len + 1,
    )
    torch.manual_seed(seed)
    return MoEDecoder(cfg), VOCAB


def _hf_model(path: str | None):
    from moeflow._deps import require

    if not path:
        raise InputError(
            "--model hf needs --path, a transformers model directory "
            "(config.json and weights, as save_pretrained writes)"
        )
    if not (Path(path) / "config.json").is_file():
        raise InputError(f"--path {path!r} is not a transformers model directory: no config.json")
    transformers = require("transformers", "moeflow bench --model hf")
    from moeflow.integrations.hf import patch_model

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    patch_model(model)
    if not moe_layers(model):
        raise ConfigError(
            "--path", path, "a mixture-of-experts model (moeflow.patch_model found no MoE layer)"
        )
    return model, model.config.vocab_size


def build_workload(
    kind: str,
    mode: str,
    setting: Setting,
    shape: Shape = Shape(),
    *,
    seed: int = 0,
    path: str | None = None,
    dims: dict | None = None,
) -> Workload:
    """A fresh model (same seed, so every setting sees the same weights and batch)."""
    if kind not in MODELS:
        raise ConfigError("model", kind, f"one of {MODELS}")
    if mode not in MODES:
        raise ConfigError("mode", mode, f"one of {MODES}")
    dims = dict(dims or {})
    if kind == "demo":
        model, vocab = _demo_model(shape, seed, dims)
    elif kind == "decoder":
        model, vocab = _decoder_model(shape, seed, dims, path)
    else:
        model, vocab = _hf_model(path)
    return Workload(kind, model, vocab, shape, setting, mode, seed=seed)


def model_dims(w: Workload) -> dict:
    """The shape facts the FLOP formulas need, read off the model itself."""
    m = w.model
    layers = moe_layers(m)
    moe = (
        layers[0].layer.cfg
        if hasattr(layers[0], "layer") and isinstance(layers[0].layer, MoELayer)
        else layers[0].cfg
    )
    if w.kind == "demo":
        c = m.cfg
        heads, kv_heads, head_dim, n_layers = (
            c.num_heads,
            c.num_heads,
            c.dim // c.num_heads,
            c.num_layers,
        )
        tied = False
    elif w.kind == "decoder":
        c = m.cfg
        heads, kv_heads, head_dim, n_layers = c.num_heads, c.num_kv_heads, c.head_dim, c.num_layers
        tied = c.tie_word_embeddings
    else:
        c = m.config
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
        n_layers = c.num_hidden_layers
        tied = bool(getattr(c, "tie_word_embeddings", False))
    return {
        "hidden": moe.hidden_size,
        "layers": n_layers,
        "heads": heads,
        "kv_heads": kv_heads,
        "head_dim": head_dim,
        "vocab": w.vocab,
        "moe": moe,
        "moe_layers": len(layers),
        "tied": tied,
    }


__all__ = [
    "MODELS",
    "BENCH_KERNELS",
    "DTYPES",
    "MODES",
    "CATEGORIES",
    "MOE_CATEGORIES",
    "Setting",
    "Shape",
    "Workload",
    "build_workload",
    "timed_modules",
    "moe_layers",
    "model_dims",
]
