"""Sharded checkpoints (``moeflow.parallel.checkpoint``, torch.distributed.checkpoint) of a
parallelized transformers model: resuming model + optimizer on the same layout continues the
same loss curve, and a save interrupted before it is published leaves the previous checkpoint
intact."""

from __future__ import annotations

import os

import pytest
import torch

from tests._dist import run_ranks

pytestmark = pytest.mark.dist
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")


class Interrupted(Exception):
    pass


def _rank(rank, world, path, ckpt_dir, mesh_shape, names, dense):
    from moeflow.parallel.checkpoint import load_checkpoint, save_checkpoint
    from tests.parallel.test_parallelize import LR, batch, build_parallel, train_steps

    ids = batch(world)[rank : rank + 1]
    model = build_parallel(path, mesh_shape, names, dense=dense)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    first = train_steps(model, opt, ids, 3, world)
    save_checkpoint(ckpt_dir, model, opt, extra={"step": 3})
    cont = train_steps(model, opt, ids, 3, world)

    def interrupt():
        raise Interrupted("killed between writing and publishing")

    try:  # a later save that dies before it is published
        save_checkpoint(ckpt_dir, model, opt, extra={"step": 6}, _before_publish=interrupt)
    except Interrupted:
        pass
    # a fresh model and optimizer resume from the step-3 checkpoint
    model2 = build_parallel(path, mesh_shape, names, dense=dense)
    model2.train()
    opt2 = torch.optim.AdamW(model2.parameters(), lr=LR)
    extra = load_checkpoint(ckpt_dir, model2, opt2)
    resumed = train_steps(model2, opt2, ids, 3, world)
    # another layout finds no keys for its shards: a typed error, not a shape mismatch
    from moeflow.errors import InputError

    other = ((2, 2), ("dp", "ep")) if mesh_shape == (4,) else ((4,), ("ep",))
    model3 = build_parallel(path, *other, dense=dense)
    try:
        load_checkpoint(ckpt_dir, model3)
        mismatch = None
    except InputError as e:
        mismatch = str(e)
    return first, cont, resumed, extra, mismatch


@pytest.mark.parametrize(
    "layout,dense",
    [
        (((4,), ("ep",)), "replicate"),
        pytest.param(((2, 2), ("dp", "ep")), "replicate", marks=pytest.mark.slow),
        pytest.param(((2, 2), ("dp", "ep")), "fsdp", marks=pytest.mark.slow),
    ],
)
def test_resume_continues_the_loss_curve_and_interrupted_save_keeps_previous(
    tmp_path, layout, dense
):
    from tests.parallel.test_parallelize import save_tiny

    path = save_tiny("qwen3_moe", tmp_path / "hf")
    ckpt_dir = str(tmp_path / "ckpt")
    res = run_ranks(_rank, 4, path, ckpt_dir, *layout, dense, timeout_s=240)
    for first, cont, resumed, extra, mismatch in res:
        assert mismatch is not None and "does not match this model/layout" in mismatch
        assert extra == {"step": 3}  # the interrupted step-6 save did not replace it
        assert max(abs(a - b) for a, b in zip(cont, resumed)) < 1e-6, (cont, resumed)
        assert cont[0] < first[0]
    assert os.path.exists(os.path.join(ckpt_dir, ".metadata"))


# ---- hostile and damaged checkpoint files --------------------------------------------------
def _tiny():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _save_rank(rank, world, ckpt_dir, layout):
    """Save; returns whether ``<ckpt_dir>.old`` held a checkpoint just before publishing."""
    from moeflow.parallel.checkpoint import checkpoint_exists, save_checkpoint

    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    seen = []
    save_checkpoint(
        ckpt_dir,
        model,
        opt,
        extra={"step": 7},
        layout=layout,
        _before_publish=lambda: seen.append(checkpoint_exists(ckpt_dir + ".old")),
    )
    return seen[0]


def _load_rank(rank, world, ckpt_dir, layout, shape):
    """The error a fresh model's load raises, as (class name, message), or the extra."""
    from moeflow.errors import MoeflowError
    from moeflow.parallel.checkpoint import load_checkpoint

    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(4, shape), torch.nn.Linear(shape, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    try:
        extra = load_checkpoint(ckpt_dir, model, opt, layout=layout)
    except MoeflowError as e:
        return type(e).__name__, str(e)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), _trained()))
    return extra, same


def _trained():
    model = _tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    return list(model.state_dict().values())


LAYOUT = {"nproc": 1, "dispatcher": "a2a", "model": {"hidden_size": 3}}


@pytest.fixture
def saved(tmp_path):
    ckpt = tmp_path / "ckpt"
    run_ranks(_save_rank, 1, str(ckpt), LAYOUT, timeout_s=60)
    return ckpt


def test_good_checkpoint_loads(saved):
    from moeflow.parallel.checkpoint import check_checkpoint

    check_checkpoint(str(saved), LAYOUT)
    assert run_ranks(_load_rank, 1, str(saved), LAYOUT, 3, timeout_s=60) == [({"step": 7}, True)]


def test_code_in_any_checkpoint_file_never_runs(saved, code_pickle):
    """A crafted pickle in the replicated objects or in DCP's metadata: refused unread by the
    parent's check and by the ranks' load, naming the file; the payload never runs."""
    import pickle
    import shutil

    from moeflow.errors import CorruptDataError
    from moeflow.parallel.checkpoint import check_checkpoint

    for name, write in [
        ("moeflow_objects.pt", lambda f: torch.save({"extra": code_pickle.payload}, f)),
        (".metadata", lambda f: f.write_bytes(pickle.dumps(code_pickle.payload))),
    ]:
        bad = saved.parent / f"bad{name}"
        shutil.copytree(saved, bad)
        write(bad / name)
        with pytest.raises(CorruptDataError, match=name.replace(".", r"\.")):
            check_checkpoint(str(bad), LAYOUT)
        kind, msg = run_ranks(_load_rank, 1, str(bad), LAYOUT, 3, timeout_s=60)[0]
        assert kind == "CorruptDataError" and name in msg, msg
        assert not code_pickle.marker.exists()


def test_damaged_checkpoint_files_are_typed_errors(saved):
    import pickle
    import shutil

    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from moeflow.errors import CorruptDataError
    from moeflow.parallel.checkpoint import check_checkpoint, read_metadata

    meta = read_metadata(str(saved))
    key = next(iter(meta.state_dict_metadata))
    meta.state_dict_metadata[key] = BytesStorageMetadata()  # DCP would torch.load it fully
    cases = {
        "truncated objects": ("moeflow_objects.pt", lambda b: b[: len(b) // 2]),
        "garbage objects": ("moeflow_objects.pt", lambda b: b"not a torch file"),
        "truncated metadata": (".metadata", lambda b: b[: len(b) // 2]),
        "bytes entry": (".metadata", lambda b: pickle.dumps(meta)),
    }
    for what, (name, mutate) in cases.items():
        bad = saved.parent / what.replace(" ", "_")
        shutil.copytree(saved, bad)
        (bad / name).write_bytes(mutate((bad / name).read_bytes()))
        if what != "bytes entry":
            with pytest.raises(CorruptDataError, match=name.replace(".", r"\.")):
                check_checkpoint(str(bad), LAYOUT)
        kind, msg = run_ranks(_load_rank, 1, str(bad), LAYOUT, 3, timeout_s=60)[0]
        assert kind == "CorruptDataError", (what, msg)


def test_other_layout_or_shape_names_what_differs(saved):
    from moeflow.errors import InputError
    from moeflow.parallel.checkpoint import check_checkpoint

    other = {**LAYOUT, "nproc": 2, "dispatcher": "2dh"}
    with pytest.raises(InputError, match=r"dispatcher 'a2a' \(this run: '2dh'\), nproc 1"):
        check_checkpoint(str(saved), other)
    kind, msg = run_ranks(_load_rank, 1, str(saved), other, 3, timeout_s=60)[0]
    assert kind == "InputError" and "nproc 1 (this run: 2)" in msg
    # no layout to compare: the shapes themselves are compared, without a traceback
    kind, msg = run_ranks(_load_rank, 1, str(saved), None, 5, timeout_s=60)[0]
    assert kind == "InputError" and "0.weight has shape (3, 4) there, (5, 4) here" in msg
    assert "\n" not in msg


def test_stale_temp_dir_and_interrupted_publish_are_recovered(saved):
    """A save killed while writing leaves ``<dir>.tmp`` with some shards; one killed between
    the renames leaves the checkpoint at ``<dir>.old``: a resume puts both right."""
    from moeflow.parallel.checkpoint import check_checkpoint, checkpoint_exists, recover_checkpoint

    tmp = saved.parent / "ckpt.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"half a shard")
    recover_checkpoint(str(saved))
    assert not tmp.exists() and checkpoint_exists(str(saved))
    saved.rename(saved.parent / "ckpt.old")
    tmp.mkdir()
    check_checkpoint(str(saved), LAYOUT)  # reads what a recovery will publish
    recover_checkpoint(str(saved))
    assert checkpoint_exists(str(saved)) and not tmp.exists()
    assert not (saved.parent / "ckpt.old").exists()
    assert run_ranks(_load_rank, 1, str(saved), LAYOUT, 3, timeout_s=60) == [({"step": 7}, True)]


def test_save_after_an_interrupted_publish_keeps_a_checkpoint(saved):
    """The checkpoint left at ``<dir>.old`` is the only one until the next save publishes."""
    from moeflow.parallel.checkpoint import checkpoint_exists

    old = saved.parent / "ckpt.old"
    saved.rename(old)

    assert run_ranks(_save_rank, 1, str(saved), LAYOUT, timeout_s=60) == [True]
    assert checkpoint_exists(str(saved)) and not old.exists()
    assert not (saved.parent / "ckpt.tmp").exists()
