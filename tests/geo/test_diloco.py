"""DiLoCo (Douillard et al., arXiv 2311.08105) as a geo training mode: the degenerate case is
plain training, the outer step is the published Nesterov update of the averaged deltas, it
trains, and each outer step all-reduces exactly the parameters' bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from moeflow.errors import ConfigError
from moeflow.geo import diloco
from moeflow.geo import pipeline as geo
from tests.geo.diloco_cases import SMALL


def _job(**kw) -> diloco.DilocoJob:
    return diloco.DilocoJob(**{**SMALL, **kw})


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # as each forked rank runs: the same float sums
    yield
    torch.set_num_threads(n)


def test_job_validation():
    with pytest.raises(ConfigError, match="mode"):
        _job(mode="pipeline")
    with pytest.raises(ConfigError, match="replicas"):
        _job(replicas=0)
    with pytest.raises(ConfigError, match="inner_steps"):
        _job(inner_steps=0)
    with pytest.raises(ConfigError, match="outer_lr"):
        _job(outer_lr=float("inf"))
    with pytest.raises(ConfigError, match="outer_momentum"):
        _job(outer_momentum=1.0)
    with pytest.raises(ConfigError, match="outer_momentum"):
        _job(outer_momentum=-0.1)
    with pytest.raises(ConfigError, match="steps"):
        _job(steps=7, inner_steps=3)
    with pytest.raises(ConfigError, match="dim"):  # the model's fields, checked as GeoJob does
        _job(dim=33)
    assert _job(mode="dp", steps=7, inner_steps=3).steps == 7  # dp has no outer step


def test_one_replica_h1_lr1_momentum0_is_plain_training(one_thread):
    job = _job(replicas=1, inner_steps=1, outer_lr=1.0, outer_momentum=0.0, steps=8)
    out = diloco.run_replica(0, 1, job)
    ref = geo.reference_losses(job.model_job())
    diff = max(abs(a - b) for a, b in zip(out["losses"], ref, strict=True))
    assert diff < 1e-5, (diff, out["losses"], ref)
    # and the parameters at the end are plain training's
    module = geo.build_module(job.model_job())
    opt = torch.optim.AdamW(module.parameters(), lr=job.lr)
    batches = geo.Batches(job.model_job())
    for step in range(job.steps):
        for idx, tgt in batches(step):
            (module(idx, tgt) / job.microbatches).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    worst = max((a - b).abs().max().item() for a, b in zip(out["params"], module.parameters()))
    assert worst < 1e-5, worst


def _hand_reference(job: diloco.DilocoJob) -> list[torch.Tensor]:
    """DiLoCo computed by hand: replicas as separate modules in this process, the outer
    step written out (average of global - local; torch's Nesterov: b <- mu b + g,
    theta <- theta - lr (g + mu b), b starting at the first g)."""
    R, H, lr, mu = job.replicas, job.inner_steps, job.outer_lr, job.outer_momentum
    models = [geo.build_module(job.model_job()) for _ in range(R)]
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    opts = [torch.optim.AdamW(ps, lr=job.lr) for ps in params]
    data = [diloco.ShardBatches(job, r) for r in range(R)]
    theta = [p.detach().clone() for p in params[0]]
    buf = None
    for step in range(job.steps):
        for r in range(R):
            for idx, tgt in data[r](step):
                (models[r](idx, tgt) / job.microbatches).backward()
            opts[r].step()
            opts[r].zero_grad(set_to_none=True)
        if (step + 1) % H:
            continue
        with torch.no_grad():
            g = [sum(t - params[r][i] for r in range(R)) / R for i, t in enumerate(theta)]
            buf = g if buf is None else [mu * b + gi for b, gi in zip(buf, g, strict=True)]
            theta = [t - lr * (gi + mu * b) for t, gi, b in zip(theta, g, buf, strict=True)]
            for r in range(R):
                for p, t in zip(params[r], theta, strict=True):
                    p.copy_(t)
    return theta


def test_two_replicas_outer_update_matches_hand_reference(one_thread):
    job = _job(replicas=2, inner_steps=3, steps=6)  # two outer steps: the momentum carries
    result = diloco.train(job, progress=False)
    ref = _hand_reference(job)
    start = [p.detach() for p in geo.build_module(job.model_job()).parameters()]
    worst = max((a - b).abs().max().item() for a, b in zip(result.params, ref, strict=True))
    moved = max((a - b).abs().max().item() for a, b in zip(result.params, start, strict=True))
    assert worst < 1e-6, worst
    assert moved > 1e-3  # the comparison is not of two untouched models
    # the replicas saw different shards
    assert result.replica_losses[0] != result.replica_losses[1]


def test_checkpoint_and_resume_equal_the_uninterrupted_run(tmp_path, one_thread):
    base = dict(replicas=2, inner_steps=2)
    full = diloco.train(_job(**base, steps=8), progress=False)
    ck = str(tmp_path / "ck")
    cut = diloco.train(_job(**base, steps=4, checkpoint_dir=ck, checkpoint_every=2), progress=False)
    assert cut.losses == full.losses[:4]
    assert diloco.latest_checkpoint(ck) == 3
    assert sorted(os.listdir(ck)) == ["latest", "step0000003"]  # older checkpoints dropped
    job = _job(**base, steps=8, checkpoint_dir=ck, resume=True)
    assert diloco.check_resume(job) == 3
    rest = diloco.train(job, progress=False)
    # the inner AdamW state, the global parameters and the outer momentum came back: the
    # same floats as without the interruption
    assert rest.losses[4:] == full.losses[4:]
    assert all(x != x for x in rest.losses[:4])  # steps before the resume are NaN
    assert all(torch.equal(a, b) for a, b in zip(rest.params, full.params, strict=True))


def test_resume_refuses_a_checkpoint_of_another_job(tmp_path):
    from moeflow.errors import InputError

    ck = str(tmp_path / "ck")
    with pytest.raises(InputError, match="no complete checkpoint"):
        diloco.check_resume(_job(steps=4, inner_steps=2, checkpoint_dir=ck, resume=True))
    diloco.train(
        _job(replicas=2, steps=2, inner_steps=2, checkpoint_dir=ck, checkpoint_every=2),
        progress=False,
    )
    with pytest.raises(InputError, match="holds 2 replicas"):
        diloco.check_resume(
            _job(replicas=3, steps=4, inner_steps=2, checkpoint_dir=ck, resume=True)
        )
    with pytest.raises(InputError, match="does not fit replica 0"):
        diloco.check_resume(_job(dim=64, steps=4, inner_steps=2, checkpoint_dir=ck, resume=True))


def _param_bytes(job) -> int:
    return sum(p.numel() * p.element_size() for p in geo.build_module(job.model_job()).parameters())


def test_diloco_trains_and_allreduces_the_parameter_bytes_per_outer_step():
    job = _job(replicas=2, inner_steps=4, steps=20)
    result = diloco.train(job, progress=False)
    first, last = result.losses[0], sum(result.losses[-4:]) / 4
    assert last < 0.85 * first, result.losses
    params = _param_bytes(job)
    # measured at the all-reduce call: one call per outer step, of the parameters' size
    assert result.allreduce_bytes == [params] * (job.steps // job.inner_steps)
    assert result.bytes_per_inner_step == pytest.approx(params / job.inner_steps)


def test_data_parallel_baseline_allreduces_every_step(one_thread):
    job = _job(mode="dp", replicas=2, steps=4)
    result = diloco.train(job, progress=False)
    params = _param_bytes(job)
    assert result.allreduce_bytes == [params] * job.steps
    # averaged gradients of the two shards = the gradient of the whole global batch: the
    # same parameters as one process on the 2x batch (same micro-batch sums up to ordering)
    whole = _job(replicas=1, microbatches=2 * job.microbatches, steps=4, mode="dp")
    mj = whole.model_job()
    module = geo.build_module(mj)
    opt = torch.optim.AdamW(module.parameters(), lr=mj.lr)
    for step in range(job.steps):
        for idx, tgt in diloco.ShardBatches(whole, 0)(step):
            (module(idx, tgt) / whole.microbatches).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    worst = max((a - b).abs().max().item() for a, b in zip(result.params, module.parameters()))
    assert worst < 1e-5, worst


def test_a_stalled_replica_ends_the_run_at_the_all_reduce_deadline(monkeypatch):
    import time

    from moeflow.errors import CommTimeoutError

    outer = diloco.Replica.outer_step

    def stall(self, allreduce):  # replica 1 never reaches its all-reduce in time
        if self.rank == 1:
            time.sleep(60)
        return outer(self, allreduce)

    monkeypatch.setattr(diloco.Replica, "outer_step", stall)  # inherited by the forked ranks
    job = _job(replicas=2, inner_steps=2, steps=4, layers=1, microbatches=1, timeout_s=2.0)
    t0 = time.monotonic()
    with pytest.raises(CommTimeoutError, match="replica 0: all-reduce 1"):
        diloco.train(job, progress=False)
    assert time.monotonic() - t0 < 30  # the deadline, not the sleep


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "moeflow.cli", "geo", "train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def no_fork(monkeypatch):
    import moeflow.launch

    def refuse(*a, **k):
        raise AssertionError("ranks were launched")

    monkeypatch.setattr(moeflow.launch, "launch", refuse)


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--mode", "diloco", "--stages", "2"], "--stages"),
        (["--mode", "dp", "--backups", "1"], "--backups"),
        (["--mode", "dp", "--resume"], "--resume"),
        (["--mode", "diloco", "--resume"], "--checkpoint-dir"),
        (
            ["--mode", "diloco", "--checkpoint-dir", "ck", "--checkpoint-every", "3"],
            "--checkpoint-every",
        ),  # not right after an outer step (H = 10)
        (["--mode", "diloco", "--inner-steps", "0"], "--inner-steps"),
        (["--mode", "diloco", "--outer-momentum", "1"], "--outer-momentum"),
        (["--mode", "diloco", "--outer-momentum", "nan"], "--outer-momentum"),
        (["--mode", "diloco", "--outer-lr", "-1"], "--outer-lr"),
        (["--mode", "diloco", "--steps", "25", "--inner-steps", "10"], "--steps"),
        (["--mode", "diloco", "--replicas", "0"], "--replicas"),
        (["--mode", "diloco", "--replicas", "65"], "--replicas"),
        (["--mode", "diloco", "--dim", "33", "--heads", "2"], "--dim"),
        (["--mode", "dp", "--inner-steps", "5"], "--inner-steps"),
        (["--mode", "dp", "--outer-lr", "0.5"], "--outer-lr"),
        (["--replicas", "2"], "--replicas"),
        (["--inner-steps", "2"], "--inner-steps"),
        (["--mode", "diloco", "--timeout", "0"], "--timeout"),
    ],
)
def test_cli_rejects_bad_flags_before_forking(no_fork, args, flag):
    from moeflow.cli import geo as cli

    with pytest.raises(ConfigError) as e:
        cli.main(["train", *args])
    assert e.value.field.startswith(flag), e.value


def test_cli_exit_code_2_on_a_bad_diloco_flag():
    r = _cli("--mode", "diloco", "--outer-momentum", "1.5")
    assert r.returncode == 2, r.stderr
    assert "ConfigError" in r.stderr and "--outer-momentum" in r.stderr, r.stderr


def test_cli_diloco_replicas_from_device_sites(tmp_path, capsys):
    from moeflow.cli import geo as cli

    out = tmp_path / "run.json"
    rc = cli.main([
        "train", "--mode", "diloco", "--devices", "tests/geo/data/geo_3sites_6devices.json",
        "--steps", "4", "--inner-steps", "2", "--dim", "32", "--layers", "1", "--heads", "2",
        "--seq-len", "16", "--microbatch-size", "2", "--microbatches", "1", "--json", str(out),
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert doc["job"]["replicas"] == 3  # sites A, B, C
    assert doc["allreduce_bytes"] == [doc["param_bytes"]] * 2
    assert len(doc["replica_losses"]) == 3
    assert "3 replicas, 2 all-reduces" in capsys.readouterr().out


@pytest.mark.slow
def test_cli_diloco_under_torchrun_one_replica_per_rank(tmp_path):
    """Under torchrun each process is one replica; rank 0 writes the report."""
    import os

    from moeflow.comm.ports import free_port

    out = tmp_path / "run.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(free_port()), "-m", "moeflow.cli", "geo", "train",
            "--mode", "diloco", "--steps", "4", "--inner-steps", "2", "--dim", "32",
            "--layers", "1", "--heads", "2", "--seq-len", "16", "--microbatch-size", "2",
            "--microbatches", "1", "--json", str(out),
        ],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["job"]["replicas"] == 2  # from WORLD_SIZE
    assert doc["allreduce_bytes"] == [doc["param_bytes"]] * 2
    assert len(doc["replica_losses"]) == 2
    assert doc["replica_losses"][0] != doc["replica_losses"][1]  # two shards
