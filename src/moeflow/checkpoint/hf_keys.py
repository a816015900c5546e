"""State-dict adapters: a moeflow :class:`~moeflow.MoELayer`'s keys and layouts <-> those of the
transformers MoE block it replaces.

One :class:`StateDictAdapter` per transformers family, used both ways:

* :meth:`StateDictAdapter.to_hf` renames ``router.weight`` -> ``gate.weight`` (or
  ``router.weight`` for GraniteMoE), ``experts.w_in`` -> ``experts.gate_up_proj``, ... and splits
  the fused shared-expert ``w_in`` (2Fs, D) into ``gate_proj`` / ``up_proj`` (Fs, D) each;
* :meth:`StateDictAdapter.from_hf` does the reverse (concatenating ``[gate; up]``).

Keys are relative to the layer (block); ``prefix`` selects one layer inside a model's state dict,
and keys outside the prefix are left alone. The mapping is pure key/layout bookkeeping, no
module needed, so the same adapter serves a patched model's ``state_dict()`` /
``load_state_dict()`` (:func:`moeflow.integrations.hf.patch_model` hooks it there) and code that
reads or writes checkpoints tensor by tensor. transformers' own checkpoint conversion (e.g.
Mixtral's per-expert ``w1``/``w3`` on disk <-> the fused ``gate_up_proj`` in memory) sits on
the other side of these names and is left to transformers.

For sharded loading and export: routed-expert tensors have the experts on dim 0 on both sides
(``w_in`` = ``gate_up_proj`` (E, 2F, D), ``w_out`` = ``down_proj`` (E, D, F)), so a rank's
expert range is the same slice of either; only shared-expert and router tensors, which every
rank holds whole, change layout.

Shape legend: E experts, D hidden, F expert FFN width, Fs shared-expert FFN width.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass

import torch

from moeflow.errors import InputError

__all__ = [
    "KeyRule",
    "StateDictAdapter",
    "ADAPTERS",
    "EXPERT_DISK_NAMES",
    "BLOCK_DISK_RENAMES",
    "fuse_disk_experts",
    "split_disk_experts",
]


@dataclass(frozen=True)
class KeyRule:
    """One moeflow tensor and the transformers tensor(s) it holds.

    ``theirs`` has one key (same tensor, same layout) or several: their tensors concatenated
    along dim 0 in this order, in equal parts, are ours (``[gate; up]`` shared-expert weights).
    """

    ours: str
    theirs: tuple[str, ...]


@dataclass(frozen=True)
class StateDictAdapter:
    """moeflow <-> transformers keys and layouts for one family's MoE block."""

    family: str
    rules: tuple[KeyRule, ...]

    def hf_keys(self) -> list[str]:
        """transformers' keys of the block, in the block's own order."""
        return [k for r in self.rules for k in r.theirs]

    def moeflow_keys(self) -> list[str]:
        return [r.ours for r in self.rules]

    def to_hf_(self, sd: MutableMapping[str, torch.Tensor], prefix: str = "") -> None:
        """In place: moeflow keys under ``prefix`` -> transformers keys and layouts. Split parts
        are copies (a state dict must not hold overlapping views: safetensors refuses them)."""
        for r in self.rules:
            t = sd.pop(prefix + r.ours, None)
            if t is None:
                continue
            if len(r.theirs) == 1:
                sd[prefix + r.theirs[0]] = t
            else:
                for key, part in zip(r.theirs, t.chunk(len(r.theirs), dim=0)):
                    sd[prefix + key] = part.clone()

    def from_hf_(self, sd: MutableMapping[str, torch.Tensor], prefix: str = "") -> None:
        """In place: transformers keys under ``prefix`` -> moeflow keys and layouts. Keys already
        in moeflow's naming pass through unchanged.

        Raises:
            InputError: only some of the parts of a concatenated tensor are present.
        """
        for r in self.rules:
            present = [prefix + k in sd for k in r.theirs]
            if not any(present):
                continue
            if not all(present):
                missing = [prefix + k for k, p in zip(r.theirs, present) if not p]
                raise InputError(
                    f"state dict has part of {prefix + r.ours}: {missing} missing "
                    f"(needs all of {[prefix + k for k in r.theirs]})"
                )
            parts = [sd.pop(prefix + k) for k in r.theirs]
            sd[prefix + r.ours] = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def to_hf(self, sd, prefix: str = "") -> dict:
        """A new dict: :meth:`to_hf_` applied to a copy of ``sd`` (tensors not copied)."""
        out = dict(sd)
        self.to_hf_(out, prefix)
        return out

    def from_hf(self, sd, prefix: str = "") -> dict:
        """A new dict: :meth:`from_hf_` applied to a copy of ``sd``."""
        out = dict(sd)
        self.from_hf_(out, prefix)
        return out


_EXPERTS = (
    KeyRule("experts.w_in", ("experts.gate_up_proj",)),
    KeyRule("experts.w_out", ("experts.down_proj",)),
)


def _shared(name: str) -> tuple[KeyRule, ...]:
    return (
        KeyRule("shared.w_in", (f"{name}.gate_proj.weight", f"{name}.up_proj.weight")),
        KeyRule("shared.w_out", (f"{name}.down_proj.weight",)),
    )


# Rules are in the block's own key order (transformers initialises in that order too).
ADAPTERS: dict[str, StateDictAdapter] = {
    # Mixtral, MiniMax, Qwen3-MoE, OLMoE, Mellum, Qwen3-VL-MoE text
    "gate_experts": StateDictAdapter(
        "gate_experts", (KeyRule("router.weight", ("gate.weight",)), *_EXPERTS)
    ),
    "granitemoe": StateDictAdapter(
        "granitemoe", (KeyRule("router.weight", ("router.weight",)), *_EXPERTS)
    ),
    # Qwen2-MoE, Qwen3-Next
    "qwen2_moe": StateDictAdapter(
        "qwen2_moe",
        (
            KeyRule("router.weight", ("gate.weight",)),
            *_EXPERTS,
            *_shared("shared_expert"),
            KeyRule("shared.gate", ("shared_expert_gate.weight",)),
        ),
    ),
    # DeepSeek-V2 (and its OCR text MoEs)
    "deepseek_v2": StateDictAdapter(
        "deepseek_v2",
        (*_EXPERTS, KeyRule("router.weight", ("gate.weight",)), *_shared("shared_experts")),
    ),
    # DeepSeek-V3, dots1, Kimi-Linear, Bailing-hybrid
    "deepseek_v3": StateDictAdapter(
        "deepseek_v3",
        (
            *_EXPERTS,
            KeyRule("router.weight", ("gate.weight",)),
            KeyRule("router.correction_bias", ("gate.e_score_correction_bias",)),
            *_shared("shared_experts"),
        ),
    ),
}


# ---- transformers' on-disk expert layout ----------------------------------------------------
# In memory transformers fuses a block's experts (``experts.gate_up_proj`` (E, 2F, D),
# ``experts.down_proj`` (E, D, F)), which the adapters above map; on disk it keeps one tensor
# per expert. These names are the one table of that layout, for whole-model loading and
# export (moeflow.checkpoint.pretrained) and for sharded slice reads (moeflow.checkpoint.shards).

#: per-expert (gate, up, down) names under ``<block>.experts.{e}.``, by naming style
EXPERT_DISK_NAMES: dict[str, tuple[str, str, str]] = {
    "proj": ("gate_proj.weight", "up_proj.weight", "down_proj.weight"),  # Qwen, DeepSeek, OLMoE
    "w": ("w1.weight", "w3.weight", "w2.weight"),  # Mixtral
}
#: in-memory block path -> on-disk block path renames transformers applies (Mixtral)
BLOCK_DISK_RENAMES = ((".mlp.", ".block_sparse_moe."),)


def fuse_disk_experts(take, prefix: str, num_experts: int, style: str) -> dict[str, torch.Tensor]:
    """``{"experts.gate_up_proj", "experts.down_proj"}`` from per-expert tensors on disk.

    ``take(key)`` returns (and consumes) one tensor; ``prefix`` is ``"<block>."``."""
    gate, up, down = EXPERT_DISK_NAMES[style]
    ex = f"{prefix}experts."
    w_in = [torch.cat([take(f"{ex}{e}.{gate}"), take(f"{ex}{e}.{up}")]) for e in range(num_experts)]
    w_out = [take(f"{ex}{e}.{down}") for e in range(num_experts)]
    return {"experts.gate_up_proj": torch.stack(w_in), "experts.down_proj": torch.stack(w_out)}


def split_disk_experts(
    gate_up: torch.Tensor, down: torch.Tensor, prefix: str, style: str
) -> dict[str, torch.Tensor]:
    """The per-expert on-disk tensors (copies) of fused ``gate_up_proj`` (E, 2F, D) and
    ``down_proj`` (E, D, F), keyed under ``prefix`` (``"<block>."``)."""
    gate, up, down_name = EXPERT_DISK_NAMES[style]
    F = gate_up.shape[1] // 2
    out = {}
    for e in range(gate_up.shape[0]):
        out[f"{prefix}experts.{e}.{gate}"] = gate_up[e, :F].clone()
        out[f"{prefix}experts.{e}.{up}"] = gate_up[e, F:].clone()
        out[f"{prefix}experts.{e}.{down_name}"] = down[e].clone()
    return out
