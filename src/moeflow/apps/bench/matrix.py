"""The rest of the dissection matrix: LoRA fine-tuning, ZeRO-3, weight-only int8, SDPA back-ends.

Each factor is applied to a built model by a well-kept library, never by kernels of our own:

* ``finetune="lora"`` - low-rank adapters (Hu et al., ICLR'22, eq. 3: ``h = W0 x + B A x``
  with ``A`` of rank ``r``) on every ``nn.Linear`` outside the MoE layers and the LM head (the
  attention projections), injected by ``peft.inject_adapter_in_model``; every other
  parameter is frozen, so backward computes no weight gradient for them and AdamW steps the
  adapters only. Training only.
* ``zero3=True`` - ZeRO stage 3 (Rajbhandari et al., SC'20: parameters, gradients and
  optimizer state partitioned over the data-parallel ranks) through FSDP2
  (``torch.distributed.fsdp.fully_shard``) on every transformer block and the root. ``moeflow
  bench`` runs it on a world of one process (a gloo group over an in-memory store when none
  is initialized): the step pays FSDP2's parameter management (DTensor parameters, unshard
  and reshard copies, the hooks around every block's forward and backward) but moves no bytes
  between ranks. Training only.
* ``quant="int8"`` - weight-only int8 (per-channel symmetric weights, activations in the
  setting's dtype) through ``torchao.quantization.quantize_`` with ``Int8WeightOnlyConfig`` on
  every ``nn.Linear`` outside the MoE layers (attention projections, LM head; the experts'
  3-D weights are no ``nn.Linear`` and stay in the setting's dtype). Decode only.
* ``sdpa`` - the back-end of ``F.scaled_dot_product_attention`` forced with
  ``torch.nn.attention.sdpa_kernel`` around every transformer block's forward (so a
  recomputed block runs the same back-end). ``default`` leaves torch's choice. A back-end
  this build cannot run (``efficient`` and ``cudnn`` on CPU) raises :class:`ConfigError`.

``peft`` and ``torchao`` come with ``pip install "moeflow[bench]"`` and are imported lazily.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from moeflow.errors import ConfigError

FINETUNES = ("full", "lora")
QUANTS = ("none", "int8")
SDPA_BACKENDS = ("default", "math", "flash", "efficient", "cudnn")
#: LoRA rank and scale (alpha / r = 2) of the fine-tuning setting
LORA_RANK = 8
LORA_ALPHA = 16


def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "math": SDPBackend.MATH,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
    }[name]


@functools.cache
def sdpa_runs(backend: str, dtype: str = "float32") -> bool:
    """Whether this build runs causal SDPA forward and backward under ``backend`` on CPU."""
    if backend == "default":
        return True
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    q = torch.randn(1, 2, 8, 8, dtype=getattr(torch, dtype), requires_grad=True)
    try:
        with sdpa_kernel(_backend(backend)):
            F.scaled_dot_product_attention(q, q, q, is_causal=True).sum().backward()
    except RuntimeError:
        return False
    return True


def available_sdpa(dtype: str = "float32") -> tuple[str, ...]:
    """The SDPA back-ends this build runs on CPU (``default`` always)."""
    return tuple(b for b in SDPA_BACKENDS if sdpa_runs(b, dtype))


def check_sdpa(backend: str, dtype: str = "float32", flag: str = "sdpa") -> None:
    if backend not in SDPA_BACKENDS:
        raise ConfigError(flag, backend, f"one of {SDPA_BACKENDS}")
    if not sdpa_runs(backend, dtype):
        raise ConfigError(
            flag,
            backend,
            f"an SDPA back-end this torch build runs on CPU in {dtype}: "
            f"{', '.join(available_sdpa(dtype))}",
        )


def _moe_ids(model: nn.Module) -> set[int]:
    """ids of every module inside an MoE layer (a :class:`moeflow.MoELayer`, or the
    ``ExpertParallel`` around one)."""
    from moeflow.layer.moe import MoELayer

    return {
        id(m)
        for layer in model.modules()
        if isinstance(layer, MoELayer) or type(layer).__name__ == "ExpertParallel"
        for m in layer.modules()
    }


def _outside_moe(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every ``nn.Linear`` outside the MoE layers and the LM head."""
    moe_ids = _moe_ids(model)
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear)
        and id(m) not in moe_ids
        and n.rsplit(".", 1)[-1] not in ("head", "lm_head")
    ]


def lora_targets(model: nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` modules LoRA adapts."""
    return [n for n, _ in _outside_moe(model)]


def apply_lora(model: nn.Module, rank: int = LORA_RANK, alpha: int = LORA_ALPHA) -> nn.Module:
    """Inject LoRA adapters in place (peft) and freeze every other parameter."""
    from moeflow._deps import require

    peft = require("peft", "the LoRA fine-tuning setting of moeflow bench")
    targets = lora_targets(model)
    if not targets:
        from moeflow.errors import UnsupportedModelError

        raise UnsupportedModelError(f"{type(model).__name__} has no nn.Linear for LoRA to adapt")
    dtype = next(model.parameters()).dtype
    cfg = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets)
    model = peft.inject_adapter_in_model(cfg, model)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n)
    model.to(dtype)  # adapters are created in fp32
    return model


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


_OWN_GROUP = [False]


def _default_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        _OWN_GROUP[0] = True


def release_group() -> None:
    """Destroy the world-of-one group :func:`apply_zero3` created, if it did (so a process
    forked later, e.g. a gloo rank of another setting, starts without one)."""
    import torch.distributed as dist

    if _OWN_GROUP[0] and dist.is_initialized():
        dist.destroy_process_group()
    _OWN_GROUP[0] = False


def apply_zero3(model: nn.Module, blocks: nn.ModuleList) -> int:
    """FSDP2 ``fully_shard`` on each block, then the root, over the default process group
    (a world of one when none exists). Returns the number of FSDP units."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _default_group()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for blk in blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks) + 1


def quant_targets(model: nn.Module) -> list[str]:
    """Full names of the ``nn.Linear`` modules weight-only int8 quantizes."""
    moe_ids = _moe_ids(model)
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) not in moe_ids
    ]


def apply_int8(model: nn.Module) -> int:
    """torchao weight-only int8 on :func:`quant_targets`; returns how many were quantized."""
    from moeflow._deps import require

    require("torchao", "the weight-only int8 setting of moeflow bench")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    names = set(quant_targets(model))
    quantize_(model, Int8WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn in names)
    return len(names)


def apply_sdpa(blocks: nn.ModuleList, backend: str, dtype: str) -> None:
    """Run every block's forward under ``sdpa_kernel(backend)``."""
    if backend == "default":
        return
    check_sdpa(backend, dtype)
    from torch.nn.attention import sdpa_kernel

    kind = _backend(backend)
    for blk in blocks:
        fwd = blk.forward

        def forward(*args, _fwd=fwd, **kwargs):
            with sdpa_kernel(kind):
                return _fwd(*args, **kwargs)

        blk.forward = forward


__all__ = [
    "FINETUNES",
    "QUANTS",
    "SDPA_BACKENDS",
    "LORA_RANK",
    "LORA_ALPHA",
    "sdpa_runs",
    "available_sdpa",
    "check_sdpa",
    "lora_targets",
    "apply_lora",
    "trainable",
    "apply_zero3",
    "release_group",
    "quant_targets",
    "apply_int8",
    "apply_sdpa",
]
