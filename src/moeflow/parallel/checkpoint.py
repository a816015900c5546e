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
untouched (and a stale ``<path>.tmp`` that the next save clears).
"""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist
import torch.nn as nn

from moeflow.errors import InputError

__all__ = ["save_checkpoint", "load_checkpoint", "checkpoint_exists"]

_META = ".metadata"  # what DCP's coordinator writes last
_OBJECTS = "moeflow_objects.pt"


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


def checkpoint_exists(path: str) -> bool:
    return os.path.exists(os.path.join(os.fspath(path), _META))


def save_checkpoint(
    path: str, model: nn.Module, optimizer=None, extra: dict | None = None, *, _before_publish=None
) -> None:
    """Save ``model`` (and ``optimizer``, and the picklable ``extra``) to directory ``path``,
    atomically (see the module docstring). Collective: every rank calls it."""
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
        torch.save(
            {"param_groups": groups, "extra": dict(extra or {})}, os.path.join(tmp, _OBJECTS)
        )
    dist.barrier()  # every rank's files and the coordinator's metadata are written
    if _before_publish is not None:
        _before_publish()  # tests: an interruption between writing and publishing
    if rank == 0:
        old = path + ".old"
        if os.path.exists(old):
            shutil.rmtree(old)
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
        if os.path.exists(old):
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(path: str, model: nn.Module, optimizer=None) -> dict:
    """Load a :func:`save_checkpoint` directory into ``model`` (and ``optimizer``) in place;
    returns the saved ``extra``. Collective. Raises InputError when ``path`` holds no
    checkpoint or not one of this model and layout."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    if not checkpoint_exists(path):
        raise InputError(f"no checkpoint at {path!r} (no {_META})")
    if optimizer is not None:
        _ensure_optimizer_state(optimizer)
    state, _ = _state(model, optimizer)
    meta = dcp.FileSystemReader(path).read_metadata()
    missing = sorted(k for k in state if k not in meta.state_dict_metadata)
    if missing:
        raise InputError(
            f"checkpoint {path!r} does not match this model/layout: it lacks "
            f"{missing[:6]}{' ...' if len(missing) > 6 else ''}"
        )
    dcp.load(state, checkpoint_id=path)
    objects = torch.load(os.path.join(path, _OBJECTS), weights_only=False)
    if optimizer is not None:
        for g, saved in zip(optimizer.param_groups, objects["param_groups"]):
            g.update(saved)
    return objects["extra"]
