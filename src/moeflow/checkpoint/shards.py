"""Read only this rank's share of a checkpoint: a safetensors file or a transformers directory.

A transformers checkpoint directory holds ``model.safetensors`` or sharded
``model-0000i-of-0000n.safetensors`` files with ``model.safetensors.index.json`` (key -> file).
:class:`SafetensorsCheckpoint` opens the files lazily with ``safe_open`` and reads tensors
through ``get_slice``, so a rank that asks for experts ``[e0, e1)`` and FFN columns
``[f0, f1)`` reads those bytes and no others (safetensors memory-maps the file; a slice
copies only its rows).

Routed-expert weights are found in any of the layouts a checkpoint may hold, for the in-memory
keys of the transformers block (``<block>.experts.gate_up_proj`` (E, 2F, D) and
``<block>.experts.down_proj`` (E, D, F), see :mod:`moeflow.checkpoint.hf_keys`):

* fused, as in memory (what ``safetensors.torch.save_file(model.state_dict())`` writes);
* one tensor per expert, as transformers writes them to disk:
  ``experts.{e}.gate_proj/up_proj/down_proj.weight`` (Qwen2/3-MoE, OLMoE, DeepSeek) or
  ``experts.{e}.w1/w3/w2.weight`` (Mixtral, whose block is ``block_sparse_moe`` on disk).

Shape legend: E experts, D hidden, F expert FFN width, X = 2F (gated) or F.
"""

from __future__ import annotations

import json
import os

import torch

from moeflow.errors import InputError

__all__ = ["SafetensorsCheckpoint", "EXPERT_DISK_LAYOUTS"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: per-expert on-disk names: (gate, up, down) under ``<block>.experts.{e}.``
EXPERT_DISK_LAYOUTS = (
    ("gate_proj.weight", "up_proj.weight", "down_proj.weight"),
    ("w1.weight", "w3.weight", "w2.weight"),
)
#: in-memory block path -> on-disk block path renames transformers applies (Mixtral)
_BLOCK_RENAMES = ((".mlp.", ".block_sparse_moe."),)


class SafetensorsCheckpoint:
    """Lazy, slice-wise access to the tensors of a safetensors file or a transformers
    checkpoint directory. Use as a context manager (or call :meth:`close`)."""

    def __init__(self, path: str):
        from moeflow._deps import require

        require("safetensors", "loading a sharded checkpoint")
        path = os.fspath(path)
        self.path = path
        if os.path.isdir(path):
            index = os.path.join(path, INDEX_NAME)
            if os.path.exists(index):
                with open(index) as f:
                    weight_map = json.load(f).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise InputError(f"{index} has no 'weight_map' object")
                self._file_of = {k: os.path.join(path, v) for k, v in weight_map.items()}
            elif os.path.exists(os.path.join(path, SINGLE_NAME)):
                self._file_of = self._keys_of(os.path.join(path, SINGLE_NAME))
            else:
                raise InputError(
                    f"checkpoint directory {path!r} has neither {INDEX_NAME} nor {SINGLE_NAME}"
                )
        elif os.path.isfile(path):
            self._file_of = self._keys_of(path)
        else:
            raise InputError(f"checkpoint path {path!r} does not exist")
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

    @staticmethod
    def _keys_of(file: str) -> dict[str, str]:
        from safetensors import safe_open

        with safe_open(file, framework="pt") as f:
            return {k: file for k in f.keys()}

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()

    def keys(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, key: str) -> bool:
        return key in self._file_of

    def _handle(self, key: str):
        from safetensors import safe_open

        file = self._file_of[key]
        h = self._handles.get(file)
        if h is None:
            h = self._handles[file] = safe_open(file, framework="pt")
        return h

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def read(self, key: str, *index: slice) -> torch.Tensor:
        """Tensor ``key``, or its slice ``[index...]`` (only those bytes are read)."""
        if key not in self._file_of:
            raise InputError(f"checkpoint {self.path!r} has no tensor {key!r}")
        sl = self._handle(key).get_slice(key)
        t = sl[index] if index else sl[:]
        self.bytes_read += t.numel() * t.element_size()
        return t

    # -- names ---------------------------------------------------------------------------
    def resolve(self, key: str) -> str | None:
        """``key`` or its on-disk spelling (Mixtral's ``block_sparse_moe``), None if absent."""
        if key in self._file_of:
            return key
        for ours, theirs in _BLOCK_RENAMES:
            alt = key.replace(ours, theirs)
            if alt in self._file_of:
                return alt
        return None

    def _expert_layout(self, experts_prefix: str, e: int) -> tuple[str, str, str] | None:
        for prefix in {experts_prefix, *(experts_prefix.replace(a, b) for a, b in _BLOCK_RENAMES)}:
            for names in EXPERT_DISK_LAYOUTS:
                keys = tuple(f"{prefix}{e}.{n}" for n in names)
                if all(k in self._file_of for k in keys):
                    return keys
        return None

    def missing_experts(self, experts_prefix: str, num_experts: int, gated: bool) -> list[str]:
        """What is missing to read experts ``0..E-1`` under ``experts_prefix``
        (``model.layers.0.mlp.experts.``) in any supported layout; [] when all are present."""
        fused = (
            experts_prefix + ("gate_up_proj" if gated else "up_proj"),
            experts_prefix + "down_proj",
        )
        if all(self.resolve(k) is not None for k in fused):
            return []
        return [
            f"{experts_prefix}{e}.*"
            for e in range(num_experts)
            if self._expert_layout(experts_prefix, e) is None
        ]

    @torch.no_grad()
    def read_experts_into(
        self,
        experts_prefix: str,
        e0: int,
        e1: int,
        f0: int,
        f1: int,
        gated: bool,
        w_in: torch.Tensor,
        w_out: torch.Tensor,
    ) -> None:
        """:meth:`read_experts` copied straight into ``w_in`` / ``w_out`` one expert at a time,
        so no second full-share temporary exists while loading."""
        f = f1 - f0
        for i, e in enumerate(range(e0, e1)):
            a, b = self.read_experts(experts_prefix, e, e + 1, f0, f1, gated)
            if gated:
                w_in[i, :f].copy_(a[0, :f])
                w_in[i, f:].copy_(a[0, f:])
            else:
                w_in[i].copy_(a[0])
            w_out[i].copy_(b[0])

    def read_experts(
        self, experts_prefix: str, e0: int, e1: int, f0: int, f1: int, gated: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Experts ``[e0, e1)`` with FFN columns ``[f0, f1)``: ``w_in`` (E_l, X_l, D) in the
        ``[gate_s; up_s]`` layout of :func:`moeflow.parallel.expert_parallel.slice_w_in` and
        ``w_out`` (E_l, D, f1 - f0), reading only those rows."""
        fused_in = self.resolve(experts_prefix + ("gate_up_proj" if gated else "up_proj"))
        fused_out = self.resolve(experts_prefix + "down_proj")
        if fused_in is not None and fused_out is not None:
            if gated:
                F = self.shape(fused_in)[1] // 2
                w_in = torch.cat(
                    [
                        self.read(fused_in, slice(e0, e1), slice(f0, f1)),
                        self.read(fused_in, slice(e0, e1), slice(F + f0, F + f1)),
                    ],
                    dim=1,
                )
            else:
                w_in = self.read(fused_in, slice(e0, e1), slice(f0, f1))
            return w_in, self.read(fused_out, slice(e0, e1), slice(None), slice(f0, f1))
        ins, outs = [], []
        for e in range(e0, e1):
            keys = self._expert_layout(experts_prefix, e)
            if keys is None:
                raise InputError(
                    f"checkpoint {self.path!r} has no weights for expert {e} "
                    f"under {experts_prefix!r}"
                )
            gate, up, down = keys
            rows = slice(f0, f1)
            ins.append(
                torch.cat([self.read(gate, rows), self.read(up, rows)])
                if gated
                else self.read(up, rows)
            )
            outs.append(self.read(down, slice(None), rows))
        return torch.stack(ins), torch.stack(outs)
