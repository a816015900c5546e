"""Load one side of a disaggregated model from a transformers checkpoint, and nothing else.

An attention rank (AG) needs the embeddings, attention, norms, router, shared experts and LM
head; an expert rank (EG) needs its ``E / eg`` routed experts of every layer
(:mod:`moeflow.serving.disaggregated`). :func:`load_attention_part` and
:func:`load_expert_part` read just those tensors from the safetensors files, as
:func:`moeflow.parallel.parallelize.load_pretrained_weights` reads a rank's expert slice.

Reads go through ``pread`` straight into the destination tensor (a
:class:`~moeflow.checkpoint.shards.SafetensorsCheckpoint` whose ``read_into`` copies a
tensor's rows from the file at their header offsets). ``safe_open`` memory-maps the file, and
the pages a read touches stay in the process's resident set as long as the file is open: a
rank that copies its experts out of the map peaks at twice their bytes. A ``pread`` leaves
the file's pages in the page cache, outside the process, so a rank's resident set grows by
what it keeps. When the stored dtype differs from the model's, one tensor (or one expert) at
a time passes through a buffer of the stored dtype.

The model is built on the meta device and materialised without its routed experts
(``mlp.experts`` is ``None`` on an attention rank), so no routed-expert byte is ever allocated
there; :func:`expert_weight_bytes` counts what a model holds.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import torch

from moeflow.checkpoint.hf_keys import EXPERT_DISK_NAMES
from moeflow.checkpoint.pretrained import attention_keys, check_pretrained
from moeflow.checkpoint.shards import SafetensorsCheckpoint
from moeflow.errors import CorruptDataError, UnsupportedModelError
from moeflow.layer.experts import Experts
from moeflow.layer.routers import build_router
from moeflow.models.decoder import MoEDecoder, Rotary

__all__ = [
    "FileCheckpoint",
    "load_attention_part",
    "load_expert_part",
    "expert_weight_bytes",
    "module_bytes",
]

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
}


class FileCheckpoint(SafetensorsCheckpoint):
    """:class:`SafetensorsCheckpoint` with :meth:`read_into`: rows of a tensor read with
    ``pread`` into a given tensor, without mapping the file."""

    def __init__(self, path):
        super().__init__(path)
        self._offsets: dict[str, tuple[int, dict]] = {}
        self._fds: dict[str, int] = {}

    def close(self) -> None:
        super().close()
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def _entry(self, key: str) -> tuple[int, int, str]:
        """(file descriptor, absolute byte offset, dtype name) of tensor ``key``."""
        file = self._file_of[key]
        if file not in self._offsets:
            with open(file, "rb") as f:  # the header was checked by checkpoint_tensors
                (n,) = struct.unpack("<Q", f.read(8))
                self._offsets[file] = (8 + n, json.loads(f.read(n)))
            self._fds[file] = os.open(file, os.O_RDONLY)
        start, header = self._offsets[file]
        entry = header[key]
        return self._fds[file], start + entry["data_offsets"][0], entry["dtype"]

    @torch.no_grad()
    def read_into(self, key: str, out: torch.Tensor, rows: tuple[int, int] | None = None) -> None:
        """Rows ``[r0, r1)`` of tensor ``key`` (all of it by default) into ``out``, a
        contiguous CPU tensor of their shape; converted when the stored dtype differs."""
        shape = self.shape(key)
        r0, r1 = rows if rows is not None else (0, shape[0] if shape else 1)
        want = (r1 - r0, *shape[1:]) if shape else ()
        if tuple(out.shape) != tuple(want):
            raise CorruptDataError(
                f"{self.path}: tensor {key!r} rows [{r0}, {r1}) are {want}, "
                f"the model needs {tuple(out.shape)}"
            )
        fd, offset, dtype_name = self._entry(key)
        stored = _DTYPES.get(dtype_name)
        if stored is None:
            raise UnsupportedModelError(f"{self.path}: tensor {key!r} has dtype {dtype_name}")
        row_bytes = stored.itemsize * (out.numel() // max(r1 - r0, 1)) if shape else 0
        dst = (
            out
            if (stored == out.dtype and out.is_contiguous())
            else torch.empty(want, dtype=stored)
        )
        view = memoryview(dst.view(torch.uint8).numpy()).cast("B")
        pos, total = offset + r0 * row_bytes, len(view)
        done = 0
        while done < total:
            n = os.preadv(fd, [view[done:]], pos + done)
            if n <= 0:
                raise CorruptDataError(f"{self.path}: tensor {key!r} is truncated")
            done += n
        self.bytes_read += total
        if dst is not out:
            out.copy_(dst)


def _dense_sources(cfg, fam) -> dict[str, list[str]]:
    """moeflow key -> the transformers keys (concatenated on dim 0) of every tensor an
    attention rank holds."""
    out = {
        "embed_tokens.weight": ["model.embed_tokens.weight"],
        "norm.weight": ["model.norm.weight"],
    }
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = ["lm_head.weight"]
    names = attention_keys(cfg) + ("input_layernorm.weight", "post_attention_layernorm.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        for n in names:
            out[dst + n] = [src + n]
        for rule in fam.block.rules:
            if not rule.ours.startswith("experts."):
                out[f"{dst}mlp.{rule.ours}"] = [f"{src}{fam.moe_attr}.{k}" for k in rule.theirs]
    return out


def load_attention_part(path, dtype: torch.dtype = torch.float32) -> tuple[MoEDecoder, int]:
    """(model, checkpoint bytes read): the :class:`MoEDecoder` of a transformers checkpoint
    without routed experts (every ``layer.mlp.experts`` is ``None``), in ``dtype``."""
    path = Path(path)
    cfg, fam = check_pretrained(path)
    with torch.device("meta"):
        model = MoEDecoder(cfg)
    for layer in model.layers:
        layer.mlp.experts = None  # on the EG ranks
        layer.mlp.router = build_router(cfg.moe)  # real buffers (correction bias)
    model.to_empty(device="cpu")
    model.to(dtype)
    # a non-persistent buffer: recomputed, in the dtype load_pretrained leaves it in
    model.rotary = Rotary(cfg.head_dim, cfg.rope_theta).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    for layer in model.layers:  # plain attributes the meta build left on the meta device
        layer.mlp.aux_loss = torch.zeros(())
        layer.mlp.last_counts_E = torch.zeros(cfg.moe.num_experts, dtype=torch.long)
    state = model.state_dict()
    sources = _dense_sources(cfg, fam)
    missing = [k for k in state if k not in sources and k != "lm_head.weight"]
    if missing:
        raise CorruptDataError(f"{path}: no checkpoint tensor for {missing[:5]}")
    with FileCheckpoint(path) as ckpt:
        for key, theirs in sources.items():
            t, row = state[key], 0
            for k in theirs:
                found = ckpt.resolve(k)
                if found is None:
                    raise CorruptDataError(f"{path}: checkpoint has no tensor {k!r}")
                n = ckpt.shape(found)[0] if ckpt.shape(found) else 1
                ckpt.read_into(found, t[row : row + n] if t.dim() else t)
                row += n
        read = ckpt.bytes_read
    return model.eval(), read


def load_expert_part(
    path, e0: int, e1: int, dtype: torch.dtype = torch.float32
) -> tuple[object, list[Experts], int]:
    """(DecoderConfig, one :class:`Experts` of experts ``[e0, e1)`` per layer, checkpoint
    bytes read), reading only those experts' weights."""
    path = Path(path)
    cfg, fam = check_pretrained(path)
    m = cfg.moe
    gate_n, up_n, down_n = EXPERT_DISK_NAMES[fam.disk_names]
    layers = []
    with FileCheckpoint(path) as ckpt:
        for i in range(cfg.num_layers):
            with torch.device("meta"):
                ex = Experts(
                    e1 - e0,
                    m.hidden_size,
                    m.ffn_hidden_size,
                    m.expert_type,
                    m.kernel,
                    m.expert_activation,
                )
            ex.to_empty(device="cpu")
            ex.to(dtype)
            F = m.ffn_hidden_size
            prefix = f"model.layers.{i}.{fam.moe_attr}.experts."
            fused_in, fused_out = (
                ckpt.resolve(prefix + "gate_up_proj"),
                ckpt.resolve(prefix + "down_proj"),
            )
            with torch.no_grad():
                if fused_in is not None and fused_out is not None:
                    ckpt.read_into(fused_in, ex.w_in.data, (e0, e1))
                    ckpt.read_into(fused_out, ex.w_out.data, (e0, e1))
                else:
                    for j, e in enumerate(range(e0, e1)):
                        keys = [f"{prefix}{e}.{n}" for n in (gate_n, up_n, down_n)]
                        found = [ckpt.resolve(k) for k in keys]
                        if None in found:
                            raise CorruptDataError(
                                f"{path}: checkpoint has no weights for expert {e} of layer {i}"
                            )
                        ckpt.read_into(found[0], ex.w_in.data[j, :F])
                        ckpt.read_into(found[1], ex.w_in.data[j, F:])
                        ckpt.read_into(found[2], ex.w_out.data[j])
            layers.append(ex.eval())
        read = ckpt.bytes_read
    return cfg, layers, read


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of ``module``'s parameters and buffers (shared tensors once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def expert_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the routed-expert weights (:class:`Experts` modules) ``model`` holds."""
    return sum(module_bytes(m) for m in model.modules() if isinstance(m, Experts))
