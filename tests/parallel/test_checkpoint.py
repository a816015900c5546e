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
