"""Checkpoint files that are safe to read: tensors and plain data only, written atomically.

The pieces every checkpoint of moeflow shares, whatever writes it (the sharded DCP checkpoints
of :mod:`moeflow.parallel.checkpoint`, one-process training, the geo pipeline's stage files):

* :func:`save_plain` / :func:`load_plain`: ``torch.save`` through a temporary file and a
  rename; ``torch.load(weights_only=True)``, so a crafted pickle never runs (a file that needs
  more than tensors and plain data is a :class:`~moeflow.errors.CorruptDataError`).
* :func:`publish` / :func:`recover_checkpoint`: a checkpoint directory is written at
  ``<path>.tmp`` and renamed into place, the previous one kept at ``<path>.old`` until the new
  one is published; a save cut short at any point leaves a checkpoint to resume from.
* :func:`write_layout` / :func:`check_layout`: the run layout a checkpoint was saved with
  (``moeflow_layout.json``), compared before anything is loaded.
* :func:`save_single` / :func:`load_single`: a one-process model and optimizer.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil

import torch

from moeflow.errors import CorruptDataError, InputError

#: the file a checkpoint directory's writer creates last (DCP's coordinator metadata)
META = ".metadata"
LAYOUT = "moeflow_layout.json"
SINGLE_STATE = "state.pt"


def save_plain(obj, path: str) -> None:
    """``torch.save(obj)`` to ``path`` through ``<path>.tmp`` and a rename."""
    path = os.fspath(path)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_plain(path: str):
    """``torch.load(path, weights_only=True)`` on the CPU: tensors and plain data only. A file
    that is missing is an InputError; one that holds anything else (a pickled object, code)
    or is truncated or not a torch file is a CorruptDataError naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        default = lines[-1] if lines else "UnpicklingError"
        why = next((ln for ln in lines if "GLOBAL" in ln or "Unsupported" in ln), default)
        raise CorruptDataError(
            f"{path}: holds more than tensors and plain data; refusing to unpickle it ({why})"
        ) from None
    except MemoryError:
        raise CorruptDataError(f"{path}: claims more data than fits in memory") from None
    except Exception as e:  # noqa: BLE001 - zip, pickle and storage errors of a damaged file
        first = str(e).splitlines()[0] if str(e) else ""
        raise CorruptDataError(
            f"{path}: not a readable torch checkpoint ({type(e).__name__}: {first[:200]})"
        ) from None


def checkpoint_exists(path: str) -> bool:
    return os.path.exists(os.path.join(os.fspath(path), META))


def publish(tmp: str, path: str) -> None:
    """Move a finished checkpoint directory ``tmp`` to ``path``: the previous one goes to
    ``<path>.old`` first and is deleted after the rename (a checkpoint already at ``.old``,
    the only one left by an earlier interruption, is kept until then)."""
    old = path + ".old"
    if os.path.exists(path):
        if os.path.exists(old):
            shutil.rmtree(old)
        os.rename(path, old)
    os.rename(tmp, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def write_layout(path: str, layout: dict | None) -> None:
    """Record ``layout`` in checkpoint directory ``path`` (nothing when None)."""
    if layout is None:
        return
    with open(os.path.join(os.fspath(path), LAYOUT), "w") as f:
        json.dump(layout, f, sort_keys=True)


def check_layout(path: str, layout: dict | None) -> None:
    """InputError naming every entry of ``layout`` that differs from the one the checkpoint at
    ``path`` was saved with (nothing to check when either side has none)."""
    file = os.path.join(os.fspath(path), LAYOUT)
    if layout is None or not os.path.exists(file):
        return
    try:
        with open(file) as f:
            saved = json.load(f)
    except (OSError, ValueError) as e:
        raise CorruptDataError(f"{file}: not a layout record ({e})") from None
    if not isinstance(saved, dict):
        raise CorruptDataError(f"{file}: not a layout record (a {type(saved).__name__})")
    want = json.loads(json.dumps(layout))  # tuples as lists, as the file has them
    diff = [
        f"{k} {saved.get(k, 'unset')!r} (this run: {want.get(k, 'unset')!r})"
        for k in sorted(set(saved) | set(want))
        if saved.get(k) != want.get(k)
    ]
    if diff:
        raise InputError(
            f"checkpoint {os.fspath(path)!r} was saved with another layout: " + ", ".join(diff)
        )


def recover_checkpoint(path: str) -> None:
    """Clean up after a save that was cut short: move a checkpoint left at ``<path>.old``
    (interrupted between the two renames) back to ``path`` and delete a stale ``<path>.tmp``.
    Call it from one process only (rank 0), before anyone reads ``path``."""
    path = os.fspath(path)
    old, tmp = path + ".old", path + ".tmp"
    if not os.path.exists(path) and checkpoint_exists(old):
        os.rename(old, path)
    for stale in (tmp, old):
        if os.path.exists(stale):
            shutil.rmtree(stale)


def save_single(path: str, model, opt, extra: dict, layout: dict | None = None) -> None:
    """A one-process model and optimizer in the same atomic layout as the sharded save
    (a temporary directory, then :func:`publish`); ``model.state_dict()`` as it is (a patched
    transformers model's own keys are the caller's to choose)."""
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    state = {"model": model.state_dict(), "optim": opt.state_dict(), "extra": extra}
    save_plain(state, os.path.join(tmp, SINGLE_STATE))
    write_layout(tmp, layout)
    with open(os.path.join(tmp, META), "w") as f:
        f.write("moeflow single-process checkpoint\n")
    publish(tmp, path)


def load_single(path: str, model, opt, layout: dict | None = None) -> dict:
    """Load a :func:`save_single` directory into ``model`` and ``opt`` in place (layout checked
    first); returns the saved ``extra``."""
    check_layout(path, layout)
    file = os.path.join(path, SINGLE_STATE)
    if not os.path.exists(file):
        raise InputError(
            f"checkpoint {path!r} is not a single-process checkpoint (no state.pt): it was "
            "saved by a run with more ranks; resume it with the same --nproc"
        )
    state = load_plain(file)
    if not isinstance(state, dict) or not {"model", "optim", "extra"} <= set(state):
        raise CorruptDataError(f"{file}: not a moeflow single-process checkpoint")
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, TypeError, AttributeError) as e:
        text = " ".join(str(e).split())
        raise InputError(f"{file} does not match this model: {text[:300]}") from None
    try:
        opt.load_state_dict(state["optim"])
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise InputError(f"{file} does not match this optimizer: {e}") from None
    return state["extra"]
