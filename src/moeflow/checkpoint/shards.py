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

Nothing read from a checkpoint directory is trusted: :func:`read_config` and
:func:`checkpoint_tensors` check ``config.json``, the index and every file's safetensors header
(its length, its JSON, each tensor's dtype, shape and byte range against the file's size)
before any tensor is read, and raise :class:`~moeflow.errors.CorruptDataError` (damaged or
inconsistent files) or :class:`~moeflow.errors.InputError` (missing files) naming the file.
"""

from __future__ import annotations

import json
import math
import os
import struct

import torch

from moeflow.checkpoint.hf_keys import BLOCK_DISK_RENAMES, EXPERT_DISK_NAMES
from moeflow.errors import CorruptDataError, InputError

__all__ = [
    "SafetensorsCheckpoint",
    "EXPERT_DISK_LAYOUTS",
    "checkpoint_tensors",
    "read_config",
    "safetensors_header",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
#: safetensors refuses headers above 100 MB; so do we, before reading one
MAX_HEADER_BYTES = 100_000_000
#: bytes per element of safetensors' dtype names (others are not size-checked)
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "F64": 8,
    "I64": 8,
    "U64": 8,
}


def _read_json(file: str, what: str):
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise InputError(f"{file}: no such file ({what})") from None
    except IsADirectoryError:
        raise InputError(f"{file}: a directory, not {what}") from None
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CorruptDataError(f"{file}: not {what} (invalid JSON: {e})") from None
    except RecursionError:
        raise CorruptDataError(f"{file}: not {what} (JSON nested too deeply)") from None


def read_config(path: str) -> dict:
    """The ``config.json`` of checkpoint directory ``path`` as a dict: InputError when it is
    missing, CorruptDataError when it is not a JSON object (truncated, garbage, a list)."""
    path = os.fspath(path)
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise InputError(f"{path!r} is not a checkpoint directory: no {CONFIG_NAME}")
    doc = _read_json(file, "a model config")
    if not isinstance(doc, dict):
        raise CorruptDataError(f"{file}: not a model config (a JSON {type(doc).__name__})")
    return doc


def safetensors_header(file: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """``{name: (dtype, shape)}`` from the header of safetensors file ``file``, after checking
    it against the file: the header length fits the file, the header is a JSON object, every
    tensor's byte range lies in the data and matches its dtype and shape. CorruptDataError
    naming the file and the tensor otherwise."""
    file = os.fspath(file)
    try:
        size = os.path.getsize(file)
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CorruptDataError(f"{file}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CorruptDataError(
                    f"{file}: safetensors header claims {n} bytes; the file has {size - 8} "
                    "after the length (truncated or not a safetensors file)"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise InputError(f"{file}: no such safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CorruptDataError(f"{file}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CorruptDataError(f"{file}: safetensors header is not a JSON object")
    data = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (b, e) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = (
                isinstance(dtype, str)
                and isinstance(shape, list)
                and all(type(d) is int and d >= 0 for d in shape)
                and type(b) is int
                and type(e) is int
            )
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise CorruptDataError(f"{file}: tensor {name!r} has a malformed header entry")
        if not 0 <= b <= e <= data:
            raise CorruptDataError(
                f"{file}: tensor {name!r} lies at bytes [{b}, {e}) of a {data}-byte data "
                "section (truncated file?)"
            )
        width = DTYPE_BYTES.get(dtype)
        if width is not None and e - b != math.prod(shape) * width:
            raise CorruptDataError(
                f"{file}: tensor {name!r} ({dtype} {shape}) needs "
                f"{math.prod(shape) * width} bytes, its range holds {e - b}"
            )
        out[name] = (dtype, tuple(shape))
    return out


def checkpoint_tensors(path: str) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """``{name: (file, dtype, shape)}`` of every tensor of a safetensors file or a transformers
    checkpoint directory (single file, or shards listed by the index), every header checked
    (:func:`safetensors_header`). InputError when the path, the weights or a shard the index
    names is missing; CorruptDataError when the index or a file is damaged, or the index puts
    a tensor in a shard that does not hold it."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return {k: (path, *v) for k, v in safetensors_header(path).items()}
    if not os.path.isdir(path):
        raise InputError(f"checkpoint path {path!r} does not exist")
    index = os.path.join(path, INDEX_NAME)
    if os.path.exists(index):
        doc = _read_json(index, "a safetensors index")
        weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()
        ):
            raise CorruptDataError(f"{index}: no 'weight_map' object of file names")
        stored = {}
        for shard in sorted(set(weight_map.values())):
            file = os.path.join(path, shard)
            if os.path.basename(shard) != shard:
                raise CorruptDataError(f"{index}: shard {shard!r} is outside the directory")
            if not os.path.isfile(file):
                raise InputError(f"{index} names shard {shard!r}, which is missing from {path}")
            stored[shard] = safetensors_header(file)
        out = {}  # the index says which tensors the checkpoint has
        for key, shard in weight_map.items():
            if key not in stored[shard]:
                raise CorruptDataError(f"{index}: tensor {key!r} is not in shard {shard!r}")
            out[key] = (os.path.join(path, shard), *stored[shard][key])
        return out
    single = os.path.join(path, SINGLE_NAME)
    if os.path.exists(single):
        return {k: (single, *v) for k, v in safetensors_header(single).items()}
    raise InputError(f"checkpoint directory {path!r} has neither {INDEX_NAME} nor {SINGLE_NAME}")


#: per-expert on-disk names and block renames: the one table in moeflow.checkpoint.hf_keys
EXPERT_DISK_LAYOUTS = tuple(EXPERT_DISK_NAMES.values())
_BLOCK_RENAMES = BLOCK_DISK_RENAMES


class SafetensorsCheckpoint:
    """Lazy, slice-wise access to the tensors of a safetensors file or a transformers
    checkpoint directory. Use as a context manager (or call :meth:`close`)."""

    def __init__(self, path: str):
        from moeflow._deps import require

        require("safetensors", "loading a sharded checkpoint")
        path = os.fspath(path)
        self.path = path
        self._meta = checkpoint_tensors(path)
        self._file_of = {k: v[0] for k, v in self._meta.items()}
        self._handles: dict[str, object] = {}
        self.bytes_read = 0

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
        return self._meta[key][2]

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

    def expert_shape_errors(
        self,
        experts_prefix: str,
        num_experts: int,
        gated: bool,
        w_in_shape: tuple[int, ...],
        w_out_shape: tuple[int, ...],
    ) -> list[str]:
        """How the stored expert weights under ``experts_prefix`` disagree with a layer whose
        ``w_in`` is ``w_in_shape`` (E, X, D) and ``w_out`` is ``w_out_shape`` (E, D, F), in
        whichever layout they are stored; [] when they agree (or are absent)."""
        fused_in = self.resolve(experts_prefix + ("gate_up_proj" if gated else "up_proj"))
        fused_out = self.resolve(experts_prefix + "down_proj")
        if fused_in is not None and fused_out is not None:
            want = ((fused_in, tuple(w_in_shape)), (fused_out, tuple(w_out_shape)))
        else:
            E, X, D = w_in_shape
            F = X // 2 if gated else X
            want = []
            for e in range(num_experts):
                keys = self._expert_layout(experts_prefix, e)
                if keys is not None:
                    gate, up, down = keys
                    want += [(up, (F, D)), (down, (D, F))] + ([(gate, (F, D))] if gated else [])
        return [
            f"{k} is {self.shape(k)}, the model needs {w}" for k, w in want if self.shape(k) != w
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
