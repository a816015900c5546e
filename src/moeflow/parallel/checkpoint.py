"""Sharded training checkpoints of a :func:`~moeflow.parallel.parallelize`-d model with
``torch.distributed.checkpoint`` (DCP): model and optimizer, every rank writing its own share.

Keys (``model.<path>`` / ``optim.<path>.<state>``): replicated tensors (the dense parts, the
routers) keep their parameter path, so DCP writes them once; expert slices are keyed per shard
(``<layer>.w_in@ep{p}of{P}.esp{s}of{S}``, :func:`~moeflow.parallel.parallelize.expert_state`),
so each shard is written once and read back by the ranks that hold it (its ``dp`` replicas).
Resuming
needs the same ``(dp, ep, esp)`` layout: a different one finds no keys for its shards and
raises InputError. Non-tensor state (the optimizer's hyper-parameters, the step, user extras)
is replicated and small: rank 0 writes it next to DCP's files (``moeflow_objects.pt``).

A save is atomic: DCP writes into ``<path>.tmp``; after every rank has finished, rank 0 moves
the previous checkpoint aside, renames the new one into place and deletes the old one. A save
interrupted at any point before the rename leaves the previous checkpoint at ``path``
untouched (and a stale ``<path>.tmp`` that :func:`recover_checkpoint` or the next save
clears); one interrupted between the two renames leaves it at ``<path>.old``, which
:func:`recover_checkpoint` moves back.

Nothing in a checkpoint is trusted to run code: every file is read as tensors and plain data
(``torch.load(weights_only=True)``, :func:`load_plain`; DCP's ``.metadata`` pickle through an
unpickler that knows only DCP's metadata classes). A file that needs more, is truncated or is
not a checkpoint raises :class:`~moeflow.errors.CorruptDataError` naming it. ``layout`` (a
small JSON-able dict the caller chooses: world size, mesh, model shape) is written next to
the state (``moeflow_layout.json``) and compared before anything is loaded, so a resume with
another layout is an InputError naming what differs.
"""

from __future__ import annotations

import os
import pickle
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn

from moeflow.checkpoint.state import (
    META,
    check_layout,
    checkpoint_exists,
    load_plain,
    publish,
    recover_checkpoint,
    save_plain,
    write_layout,
)
from moeflow.errors import CorruptDataError, InputError

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "checkpoint_exists",
    "check_checkpoint",
    "check_layout",
    "load_plain",
    "recover_checkpoint",
    "write_layout",
]

_OBJECTS = "moeflow_objects.pt"


#: the only globals DCP's ``.metadata`` pickle may name
_META_GLOBALS = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        ok = name in _META_GLOBALS.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        )
        if not ok:
            raise pickle.UnpicklingError(f"global {module}.{name} is not DCP metadata")
        return super().find_class(module, name)


def read_metadata(path: str, rank: int | None = None):
    """DCP's ``<path>/.metadata`` (``__<rank>.metadata`` with ``rank``), unpickled with only
    DCP's metadata classes allowed; a CorruptDataError naming the file when it holds anything
    else or is damaged."""
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import Metadata

    file = os.path.join(os.fspath(path), META if rank is None else f"__{rank}{META}")
    try:
        with open(file, "rb") as f:
            meta = _MetadataUnpickler(f).load()
    except FileNotFoundError:
        raise InputError(f"no checkpoint at {os.fspath(path)!r} (no {META})") from None
    except MemoryError:
        raise CorruptDataError(f"{file}: claims more data than fits in memory") from None
    except Exception as e:  # noqa: BLE001 - any unpickling failure of a damaged file
        raise CorruptDataError(
            f"{file}: not DCP checkpoint metadata ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(meta, Metadata) or not isinstance(meta.state_dict_metadata, dict):
        raise CorruptDataError(f"{file}: not DCP checkpoint metadata ({type(meta).__name__})")
    for info in (meta.storage_data or {}).values():
        rel = getattr(info, "relative_path", None)
        if not isinstance(info, _StorageInfo) or not isinstance(rel, str):
            raise CorruptDataError(f"{file}: a storage entry is not a file in the checkpoint")
        if os.path.basename(rel) != rel or rel in ("", ".", ".."):
            raise CorruptDataError(f"{file}: storage file {rel!r} is outside the checkpoint")
    return meta


def _reader(path: str):
    """A DCP FileSystemReader whose metadata goes through :func:`read_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader

    class _SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta = read_metadata(self.path, kwargs.get("rank"))
            if getattr(meta, "storage_meta", None) is None:
                from torch.distributed.checkpoint.metadata import StorageMeta

                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return _SafeReader(path)


def _single_process_error(path: str) -> InputError:
    return InputError(
        f"checkpoint {path!r} was saved by a single-process run (state.pt, no DCP shards); "
        "resume it with one process"
    )


def check_checkpoint(path: str, layout: dict | None = None, sharded: bool | None = None) -> None:
    """Read what a resume from ``path`` reads before the model exists: the layout record, DCP's
    metadata or the single-process state, the replicated objects. ``sharded``: whether the
    resuming run is a multi-rank (DCP) one (None: either). Raises InputError /
    CorruptDataError naming the file; meant for the parent before any rank starts."""
    path = os.fspath(path)
    if not checkpoint_exists(path) and checkpoint_exists(path + ".old"):
        path += ".old"  # what recover_checkpoint will publish
    if not checkpoint_exists(path):
        return
    check_layout(path, layout)
    single = os.path.join(path, "state.pt")
    if sharded is not None and sharded == os.path.exists(single):
        if sharded:
            raise _single_process_error(path)
        raise InputError(
            f"checkpoint {path!r} was saved by a multi-rank run (DCP shards, no state.pt); "
            "resume it with the same --nproc"
        )
    if os.path.exists(single):
        state = load_plain(single)
        if not isinstance(state, dict) or not {"model", "optim", "extra"} <= set(state):
            raise CorruptDataError(f"{single}: not a moeflow single-process checkpoint")
        return
    read_metadata(path)
    objects = load_plain(os.path.join(path, _OBJECTS))
    if not isinstance(objects, dict) or not {"param_groups", "extra"} <= set(objects):
        raise CorruptDataError(f"{os.path.join(path, _OBJECTS)}: not moeflow checkpoint objects")


def _model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    from moeflow.parallel.data_parallel import expert_parameter_ids
    from moeflow.parallel.parallelize import expert_state, named_tensors

    expert_ids = expert_parameter_ids(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in named_tensors(model):
        if id(t) in seen or id(t) in expert_ids:
            continue
        seen.add(id(t))
        out[name] = t
    out.update(expert_state(model))
    return out


def _param_names(model: nn.Module) -> dict[int, str]:
    """Parameter id -> its checkpoint key (the shard key for expert slices)."""
    return {id(t): name for name, t in _model_tensors(model).items()}


def _ensure_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create the optimizer's per-parameter state (a step with lr 0 and zero gradients, which
    changes no parameter) so that DCP has tensors to load into."""
    if all(p in optimizer.state for g in optimizer.param_groups for p in g["params"]):
        return
    saved_lr = [g["lr"] for g in optimizer.param_groups]
    grads = {}
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            grads[p] = p.grad
            p.grad = torch.zeros_like(p)
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, saved_lr):
            g["lr"] = lr
        for p, gr in grads.items():
            p.grad = gr


def _state(model: nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """The flat tensor state DCP shards, and the optimizer's hyper-parameters (replicated)."""
    state: dict[str, torch.Tensor] = {f"model.{k}": v for k, v in _model_tensors(model).items()}
    groups = []
    if optimizer is not None:
        names = _param_names(model)
        for g in optimizer.param_groups:
            groups.append({k: v for k, v in g.items() if k != "params"})
            for p in g["params"]:
                if id(p) not in names:
                    raise InputError("the optimizer holds a parameter that is not the model's")
                for k, v in optimizer.state.get(p, {}).items():
                    if not isinstance(v, torch.Tensor):
                        v = torch.tensor(v)
                    state[f"optim.{names[id(p)]}.{k}"] = v
    return state, groups


def save_checkpoint(
    path: str,
    model: nn.Module,
    optimizer=None,
    extra: dict | None = None,
    *,
    layout: dict | None = None,
    _before_publish=None,
) -> None:
    """Save ``model`` (and ``optimizer``, and ``extra``: tensors and plain data) to directory
    ``path``, atomically, with ``layout`` (see the module docstring). Collective: every rank
    calls it."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    tmp = path + ".tmp"
    rank = dist.get_rank()
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)  # a stale half-written save
    dist.barrier()
    state, groups = _state(model, optimizer)
    dcp.save(state, checkpoint_id=tmp)
    if rank == 0:  # replicated, small: hyper-parameters and the caller's extras
        save_plain(
            {"param_groups": groups, "extra": dict(extra or {})}, os.path.join(tmp, _OBJECTS)
        )
        write_layout(tmp, layout)
    dist.barrier()  # every rank's files and the coordinator's metadata are written
    if _before_publish is not None:
        _before_publish()  # tests: an interruption between writing and publishing
    if rank == 0:
        publish(tmp, path)
    dist.barrier()


def load_checkpoint(path: str, model: nn.Module, optimizer=None, *, layout: dict | None = None):
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``) in place;
    returns the saved ``extra``. Collective. Raises InputError when ``path`` holds no
    checkpoint or not one of this model and layout (naming what differs), CorruptDataError
    when a file of it is damaged or holds more than tensors and plain data."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = os.fspath(path)
    if not checkpoint_exists(path):
        raise InputError(f"no checkpoint at {path!r} (no {META})")
    check_layout(path, layout)
    if os.path.exists(os.path.join(path, "state.pt")):
        raise _single_process_error(path)
    objects = load_plain(os.path.join(path, _OBJECTS))
    if not isinstance(objects, dict) or not {"param_groups", "extra"} <= set(objects):
        raise CorruptDataError(f"{os.path.join(path, _OBJECTS)}: not moeflow checkpoint objects")
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
    state, _ = _state(model, optimizer)
    saved = read_metadata(path).state_dict_metadata
    missing = sorted(k for k in state if k not in saved)
    if missing:
        raise InputError(
            f"checkpoint {path!r} does not match this model/layout: it lacks "
            f"{missing[:6]}{' ...' if len(missing) > 6 else ''}"
        )
    for k, t in state.items():
        md = saved[k]
        if not isinstance(md, TensorStorageMetadata):
            raise CorruptDataError(f"{path}/{META}: {k} is not stored as a tensor")
        if tuple(md.size) != tuple(t.shape):
            raise InputError(
                f"checkpoint {path!r} does not match this model/layout: {k} has shape "
                f"{tuple(md.size)} there, {tuple(t.shape)} here"
            )
    try:
        dcp.load(state, storage_reader=_reader(path))
    except CheckpointException as e:
        failures = getattr(e, "failures", {}) or {}
        first = next(iter(failures.values()), e)
        if isinstance(first, tuple):  # (exception, traceback) on some versions
            first = first[0]
        if isinstance(first, (InputError, CorruptDataError)):
            raise first from None
        text = str(first).splitlines()[0] if str(first) else type(first).__name__
        raise CorruptDataError(
            f"checkpoint {path!r}: a shard file is unreadable ({text})"
        ) from None
    groups = objects["param_groups"]
    if optimizer is not None:
        if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
            raise InputError(
                f"checkpoint {path!r} does not match this optimizer: "
                f"{len(groups) if isinstance(groups, list) else groups!r} parameter groups, "
                f"this optimizer has {len(optimizer.param_groups)}"
            )
        for g, saved_group in zip(optimizer.param_groups, groups):
            g.update(saved_group)
    return objects["extra"]
