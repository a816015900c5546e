"""Checkpoint files: plain data only, atomic writes, a previous checkpoint never lost."""

import os

import pytest
import torch

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


def _ckpt(path, value: float):
    os.makedirs(path)
    save_plain({"w": torch.full((2,), value)}, os.path.join(path, "state.pt"))
    open(os.path.join(path, META), "w").close()


def test_save_plain_round_trips_and_leaves_no_temp(tmp_path):
    f = tmp_path / "s.pt"
    save_plain({"step": 3, "t": torch.arange(4)}, f)
    back = load_plain(f)
    assert back["step"] == 3 and torch.equal(back["t"], torch.arange(4))
    assert os.listdir(tmp_path) == ["s.pt"]


class _Code:
    def __reduce__(self):
        return (os.getcwd, ())


def test_load_plain_refuses_objects_and_garbage(tmp_path):
    torch.save({"x": _Code()}, tmp_path / "code.pt")
    with pytest.raises(CorruptDataError, match="refusing to unpickle"):
        load_plain(tmp_path / "code.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptDataError, match="junk.pt"):
        load_plain(tmp_path / "junk.pt")
    with pytest.raises(InputError, match="no such checkpoint file"):
        load_plain(tmp_path / "absent.pt")


def test_publish_replaces_and_recover_restores_an_interrupted_publish(tmp_path):
    path = str(tmp_path / "ckpt")
    _ckpt(path + ".tmp", 1.0)
    publish(path + ".tmp", path)
    assert checkpoint_exists(path) and not os.path.exists(path + ".tmp")
    _ckpt(path + ".tmp", 2.0)
    publish(path + ".tmp", path)
    assert load_plain(os.path.join(path, "state.pt"))["w"][0] == 2.0
    assert not os.path.exists(path + ".old")
    # cut between the two renames: the only checkpoint is at .old, a half save at .tmp
    os.rename(path, path + ".old")
    os.makedirs(path + ".tmp")
    recover_checkpoint(path)
    assert load_plain(os.path.join(path, "state.pt"))["w"][0] == 2.0
    assert not os.path.exists(path + ".old") and not os.path.exists(path + ".tmp")


def test_layout_record_names_every_difference(tmp_path):
    write_layout(tmp_path, {"nproc": 2, "dispatcher": "a2a", "mesh": (1, 2)})
    check_layout(tmp_path, {"nproc": 2, "dispatcher": "a2a", "mesh": [1, 2]})  # same
    with pytest.raises(
        InputError, match=r"mesh \[1, 2\] \(this run: \[2, 2\]\), nproc 2 \(this run: 4\)"
    ):
        check_layout(tmp_path, {"nproc": 4, "dispatcher": "a2a", "mesh": (2, 2)})
    check_layout(tmp_path, None)  # nothing to compare
