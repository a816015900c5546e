"""Load transformers checkpoint directories (Qwen3-MoE, Mixtral, DeepSeek-V2) into
:class:`MoEDecoder`, and export back: one state-dict adapter per family, used both ways.

A checkpoint directory is what ``save_pretrained`` writes: ``config.json`` and
``model.safetensors`` (or shards with ``model.safetensors.index.json``). On disk transformers
keeps per-expert tensors (Mixtral ``experts.{e}.w1/w2/w3``, Qwen3-MoE
``experts.{e}.gate_proj/up_proj/down_proj``); in memory it fuses them
(``experts.gate_up_proj`` (E, 2F, D), ``experts.down_proj`` (E, D, F)), which is moeflow's
layout too. Both spellings load.

Other keys map one to one::

    model.embed_tokens.weight                 embed_tokens.weight
    model.layers.{i}.self_attn.{q,k,v,o}_proj layers.{i}.self_attn.{q,k,v,o}_proj
    model.layers.{i}.self_attn.{q,k}_norm     layers.{i}.self_attn.{q,k}_norm    (Qwen3)
    model.layers.{i}.{input,post_attention}_layernorm   the same
    model.layers.{i}.<moe>.gate.weight        layers.{i}.mlp.router.weight
    model.norm.weight / lm_head.weight        norm.weight / lm_head.weight

with ``<moe>`` = ``mlp`` (Qwen3-MoE, DeepSeek-V2) or ``block_sparse_moe`` (Mixtral).
DeepSeek-V2's attention keys (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj`` or ``q_proj``,
``kv_a_proj_with_mqa``, ``kv_a_layernorm``, ``kv_b_proj``, ``o_proj``) map one to one, and its
``mlp.shared_experts.{gate,up,down}_proj`` become ``mlp.shared.w_in`` (``[gate; up]``) and
``mlp.shared.w_out``. Models whose first layers are dense (``first_k_dense_replace > 0``) are
refused: every moeflow layer is an MoE layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moeflow.checkpoint.hf_keys import (
    ADAPTERS,
    StateDictAdapter,
    fuse_disk_experts,
    split_disk_experts,
)
from moeflow.config import MoEConfig
from moeflow.errors import CorruptDataError, InputError, UnsupportedModelError
from moeflow.models.config import DecoderConfig
from moeflow.models.decoder import MoEDecoder


@dataclass(frozen=True)
class Family:
    """A transformers model family: its MoE block's attribute name, the block's key table
    (:data:`moeflow.checkpoint.hf_keys.ADAPTERS`), the on-disk per-expert naming
    (:data:`~moeflow.checkpoint.hf_keys.EXPERT_DISK_NAMES`) and whether attention has q/k
    norms."""

    model_type: str
    moe_attr: str
    adapter: str
    disk_names: str
    qk_norm: bool

    @property
    def block(self) -> StateDictAdapter:
        return ADAPTERS[self.adapter]


FAMILIES: dict[str, Family] = {
    "qwen3_moe": Family("qwen3_moe", "mlp", "gate_experts", "proj", True),
    "mixtral": Family("mixtral", "block_sparse_moe", "gate_experts", "w", False),
    "deepseek_v2": Family("deepseek_v2", "mlp", "deepseek_v2", "proj", False),
}

_GQA_KEYS = (
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
)
_MLA_KEYS = (
    "self_attn.kv_a_proj_with_mqa.weight",
    "self_attn.kv_a_layernorm.weight",
    "self_attn.kv_b_proj.weight",
    "self_attn.o_proj.weight",
)
_MLA_Q = (
    "self_attn.q_a_proj.weight",
    "self_attn.q_a_layernorm.weight",
    "self_attn.q_b_proj.weight",
)


def attention_keys(cfg: DecoderConfig) -> tuple[str, ...]:
    """The attention tensors of one decoder layer, as named under ``model.layers.N.``
    (MLA or grouped-query attention, with q/k norms where the config has them)."""
    if cfg.attention == "mla":
        q = ("self_attn.q_proj.weight",) if cfg.q_lora_rank is None else _MLA_Q
        return q + _MLA_KEYS
    return _GQA_KEYS + (
        ("self_attn.q_norm.weight", "self_attn.k_norm.weight") if cfg.qk_norm else ()
    )


def _deepseek_v2_config(hf: dict) -> tuple[MoEConfig, dict]:
    if hf.get("first_k_dense_replace", 0) or hf.get("moe_layer_freq", 1) != 1:
        raise UnsupportedModelError(
            "DeepSeek-V2 with dense layers (first_k_dense_replace > 0 "
            "or moe_layer_freq != 1) is not supported"
        )
    method = hf.get("topk_method", "greedy")
    if method == "greedy":
        n_group, topk_group = 1, 1
    elif method == "group_limited_greedy":
        n_group, topk_group = int(hf["n_group"]), int(hf["topk_group"])
    else:
        raise UnsupportedModelError(
            f"topk_method={method!r} is not supported: 'greedy' or 'group_limited_greedy'"
        )
    n_shared = int(hf.get("n_shared_experts") or 0)
    moe = MoEConfig(
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["moe_intermediate_size"],
        num_experts=hf["n_routed_experts"],
        top_k=hf["num_experts_per_tok"],
        router="deepseek",
        score_func="softmax",
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        num_shared_experts=n_shared,
        shared_ffn_hidden_size=hf["moe_intermediate_size"] if n_shared else None,
    )
    mla = dict(
        attention="mla",
        q_lora_rank=hf.get("q_lora_rank"),
        kv_lora_rank=hf["kv_lora_rank"],
        qk_nope_head_dim=hf["qk_nope_head_dim"],
        v_head_dim=hf["v_head_dim"],
        head_dim=hf["qk_rope_head_dim"],
    )
    return moe, mla


def config_from_hf(hf: dict) -> tuple[DecoderConfig, Family]:
    """A :class:`DecoderConfig` from a transformers ``config.json`` dict."""
    mt = hf.get("model_type")
    if mt not in FAMILIES:
        raise UnsupportedModelError(
            f"model_type={mt!r} is not supported: one of {sorted(FAMILIES)}"
        )
    fam = FAMILIES[mt]
    if hf.get("sliding_window") not in (None, 0) and mt == "mixtral":
        raise UnsupportedModelError(
            "Mixtral with sliding_window is not supported (full attention only)"
        )
    if hf.get("attention_bias"):
        raise UnsupportedModelError(f"{mt} with attention_bias=True is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(
            f"hidden_act={hf.get('hidden_act')!r} is not supported: 'silu' (SwiGLU experts)"
        )
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise UnsupportedModelError(
            f"rope type {rope.get('rope_type')!r} is not supported: 'default' only"
        )
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    D, H = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or D // H
    extra: dict = {}
    if mt == "deepseek_v2":
        moe, extra = _deepseek_v2_config(hf)
        head_dim = extra.pop("head_dim")
    elif mt == "qwen3_moe":
        if hf.get("mlp_only_layers") or hf.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedModelError(
                "Qwen3-MoE with dense layers (mlp_only_layers, "
                "decoder_sparse_step) is not supported"
            )
        moe = MoEConfig(
            hidden_size=D,
            ffn_hidden_size=hf["moe_intermediate_size"],
            num_experts=hf.get("num_experts") or hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            router_dtype="input",
        )
    else:
        moe = MoEConfig(
            hidden_size=D,
            ffn_hidden_size=hf["intermediate_size"],
            num_experts=hf["num_local_experts"],
            top_k=hf["num_experts_per_tok"],
            norm_topk_prob=True,
            router_dtype="input",
        )
    cfg = DecoderConfig(
        vocab_size=hf["vocab_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=H,
        num_kv_heads=hf.get("num_key_value_heads") or H,
        head_dim=head_dim,
        moe=moe,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qk_norm=fam.qk_norm,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        family=mt,
        **extra,
    )
    return cfg, fam


def from_hf_state_dict(sd: dict, cfg: DecoderConfig, fam: Family) -> dict:
    """transformers keys (per-expert or fused) -> :class:`MoEDecoder` keys. Each MoE block
    goes through its family's key table (:mod:`moeflow.checkpoint.hf_keys`)."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        try:
            return sd.pop(key)
        except KeyError:
            raise CorruptDataError(f"checkpoint has no tensor {key!r}") from None

    out["embed_tokens.weight"] = take("model.embed_tokens.weight")
    out["norm.weight"] = take("model.norm.weight")
    if "lm_head.weight" in sd:
        out["lm_head.weight"] = sd.pop("lm_head.weight")
    elif cfg.tie_word_embeddings:
        out["lm_head.weight"] = out["embed_tokens.weight"]
    else:
        raise CorruptDataError("checkpoint has no tensor 'lm_head.weight'")
    E = cfg.moe.num_experts
    ours = ["router.weight", "experts.w_in", "experts.w_out"]
    if cfg.moe.num_shared_experts and any(r.ours == "shared.w_in" for r in fam.block.rules):
        ours += ["shared.w_in", "shared.w_out"]
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        names = attention_keys(cfg) + ("input_layernorm.weight", "post_attention_layernorm.weight")
        for n in names:
            out[dst + n] = take(src + n)
        moe = f"{src}{fam.moe_attr}."
        block = {k[len(moe) :]: sd.pop(k) for k in [k for k in sd if k.startswith(moe)]}
        if "experts.gate_up_proj" not in block:  # per-expert tensors, as on disk
            take_expert = lambda k, b=block, m=moe: _pop(b, m, k)  # noqa: E731
            block.update(fuse_disk_experts(take_expert, "", E, fam.disk_names))
        fam.block.from_hf_(block)
        for k in ours:
            out[f"{dst}mlp.{k}"] = _pop(block, moe, k)
        sd.update({moe + k: v for k, v in block.items()})  # left over: reported below
    left = sorted(k for k in sd if "rotary_emb" not in k)
    if left:
        raise UnsupportedModelError(
            f"checkpoint tensors moeflow does not model: {left[:5]}"
            + (" ..." if len(left) > 5 else "")
        )
    return out


def _pop(block: dict, prefix: str, key: str) -> torch.Tensor:
    try:
        return block.pop(key)
    except KeyError:
        raise CorruptDataError(f"checkpoint has no tensor {prefix + key!r}") from None


def to_hf_state_dict(model: MoEDecoder, fam: Family | str) -> dict:
    """:class:`MoEDecoder` state -> transformers' on-disk keys (per-expert tensors), each MoE
    block through its family's key table."""
    fam = FAMILIES[fam] if isinstance(fam, str) else fam
    cfg, sd = model.cfg, model.state_dict()
    out = {
        "model.embed_tokens.weight": sd["embed_tokens.weight"],
        "model.norm.weight": sd["norm.weight"],
        "lm_head.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        for k, v in sd.items():
            if k.startswith(src) and ".mlp." not in k:
                out[dst + k[len(src) :]] = v
        mlp = f"{src}mlp."
        block = fam.block.to_hf({k[len(mlp) :]: v for k, v in sd.items() if k.startswith(mlp)})
        moe = f"{dst}{fam.moe_attr}."
        gate_up, down = block.pop("experts.gate_up_proj"), block.pop("experts.down_proj")
        out.update({moe + k: v for k, v in block.items()})
        out.update(split_disk_experts(gate_up, down, moe, fam.disk_names))
    return out


def _config(path: Path) -> tuple[DecoderConfig, Family]:
    """The checked ``config.json`` of ``path`` as a :class:`DecoderConfig`; a field that is
    missing or of the wrong type is a CorruptDataError naming the file."""
    from moeflow.checkpoint.shards import read_config
    from moeflow.errors import MoeflowError

    hf = read_config(path)
    try:
        return config_from_hf(hf)
    except MoeflowError:
        raise
    except KeyError as e:
        raise CorruptDataError(f"{path / 'config.json'}: no field {e}") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:
        raise CorruptDataError(f"{path / 'config.json'}: a field has a wrong value ({e})") from None


def _convert(sd: dict, cfg: DecoderConfig, fam: Family, path: Path) -> dict:
    """:func:`from_hf_state_dict`, with tensors that cannot be joined (experts of different
    shapes) a CorruptDataError naming the directory."""
    try:
        return from_hf_state_dict(sd, cfg, fam)
    except CorruptDataError as e:
        raise CorruptDataError(f"{path}: {e}") from None
    except RuntimeError as e:
        text = " ".join(str(e).split())[:200]
        raise CorruptDataError(
            f"{path}: tensor shapes disagree with each other or with config.json ({text})"
        ) from None


def check_pretrained(path) -> tuple[DecoderConfig, Family]:
    """Everything :func:`load_pretrained` checks, without reading a weight: ``config.json``,
    every safetensors header (:func:`moeflow.checkpoint.shards.checkpoint_tensors`), and that
    every tensor the config implies is there with its shape. Raises InputError (missing
    files), CorruptDataError (damaged files, shapes that disagree with the config, naming the
    tensor) or UnsupportedModelError."""
    from moeflow._deps import require
    from moeflow.checkpoint.shards import checkpoint_tensors

    require("safetensors", "loading transformers checkpoints")
    path = Path(path)
    cfg, fam = _config(path)
    try:
        stored = checkpoint_tensors(path)
    except InputError as e:
        if "neither" not in str(e):
            raise
        raise InputError(
            f"{str(path)!r} has no model.safetensors (save the model with "
            "save_pretrained(..., safe_serialization=True))"
        ) from None
    fake = {k: torch.empty(shape, device="meta") for k, (_, _, shape) in stored.items()}
    sd = _convert(fake, cfg, fam, path)
    with torch.device("meta"):
        want = MoEDecoder(cfg).state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    if missing or unexpected:
        raise CorruptDataError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    wrong = [
        f"{k} is {tuple(sd[k].shape)}, config.json implies {tuple(t.shape)}"
        for k, t in want.items()
        if tuple(sd[k].shape) != tuple(t.shape)
    ]
    if wrong:
        raise CorruptDataError(
            f"{path}: tensor shapes disagree with config.json: {'; '.join(wrong[:4])}"
            + (f" (+{len(wrong) - 4} more)" if len(wrong) > 4 else "")
        )
    return cfg, fam


def _read_tensors(path: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from moeflow.checkpoint.shards import checkpoint_tensors

    sd: dict = {}
    for f in sorted({file for file, _, _ in checkpoint_tensors(path).values()}):
        try:
            sd.update(load_file(f))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CorruptDataError(f"{f}: unreadable safetensors file ({e})") from None
    return sd


def load_pretrained(path, dtype: torch.dtype = torch.float32) -> MoEDecoder:
    """A :class:`MoEDecoder` with the weights of a transformers checkpoint directory (checked
    first with :func:`check_pretrained`)."""
    path = Path(path)
    cfg, fam = check_pretrained(path)
    sd = _convert(_read_tensors(path), cfg, fam, path)
    model = MoEDecoder(cfg)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CorruptDataError(
            f"checkpoint does not match the model: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    return model.to(dtype).eval()
