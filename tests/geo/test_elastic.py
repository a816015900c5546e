"""DiLoCo with changing membership: a replica that leaves is replaced by a spare from the last
checkpoint (the run equals the uninterrupted one), a device that joins becomes a new replica
at the next outer step (the run equals DiLoCo computed by hand with the replica added there),
or a spare when the job has its most replicas."""

from __future__ import annotations

import pytest
import torch

from moeflow.errors import ConfigError
from moeflow.geo import diloco, elastic
from moeflow.geo import pipeline as geo
from tests.geo.diloco_cases import SMALL


def _job(**kw) -> diloco.DilocoJob:
    return diloco.DilocoJob(**{**SMALL, "replicas": 2, "inner_steps": 2, "steps": 8, **kw})


def test_validation():
    with pytest.raises(ConfigError, match="mode"):
        elastic.ElasticJob(diloco=_job(mode="dp"))
    with pytest.raises(ConfigError, match="max_replicas"):
        elastic.ElasticJob(diloco=_job(), max_replicas=1)
    with pytest.raises(ConfigError, match="joins"):
        elastic.ElasticJob(diloco=_job(), joins=(8,))
    with pytest.raises(ConfigError, match="kill"):
        elastic.ElasticJob(diloco=_job(), kill=(2, 0))
    assert elastic.ElasticJob(diloco=_job(), backups=1, joins=(1, 3)).world == 5


@pytest.mark.slow
def test_a_replica_that_leaves_is_replaced_from_the_last_checkpoint(tmp_path):
    full = diloco.train(_job(), progress=False)
    ck = str(tmp_path / "ck")
    job = elastic.ElasticJob(
        diloco=_job(checkpoint_dir=ck, checkpoint_every=2), backups=1, kill=(1, 5)
    )
    result = elastic.train(job, progress=False)
    assert any("replica 1 (device 1) left during step" in e for e in result.events), result.events
    assert any("spare device 2 takes it; resuming after step 3" in e for e in result.events)
    # the spare loaded replica 1's checkpoint (its inner AdamW, the global state): steps 4-7
    # are redone exactly as the uninterrupted run did them
    assert result.losses == pytest.approx(full.losses, abs=1e-6)
    worst = max((a - b).abs().max().item() for a, b in zip(result.params, full.params, strict=True))
    assert worst < 1e-6, worst


def _hand_reference_with_join(job: diloco.DilocoJob, join_after: int) -> list[torch.Tensor]:
    """DiLoCo by hand, replicas as modules in this process; a third replica starts after
    step ``join_after`` (an outer step) from the global parameters with a fresh AdamW, and
    from then on every replica takes its shard of three."""
    models = [geo.build_module(job.model_job()) for _ in range(3)]
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    opts = [torch.optim.AdamW(ps, lr=job.lr) for ps in params]
    theta = [p.detach().clone() for p in params[0]]
    buf = None
    mu, lr = job.outer_momentum, job.outer_lr
    for step in range(job.steps):
        R = 2 if step <= join_after else 3
        sub = diloco.DilocoJob(**{**SMALL, "replicas": R, "inner_steps": 2, "steps": 8})
        for r in range(R):
            for idx, tgt in diloco.ShardBatches(sub, r)(step):
                (models[r](idx, tgt) / job.microbatches).backward()
            opts[r].step()
            opts[r].zero_grad(set_to_none=True)
        if (step + 1) % job.inner_steps:
            continue
        with torch.no_grad():
            g = [sum(t - params[r][i] for r in range(R)) / R for i, t in enumerate(theta)]
            buf = g if buf is None else [mu * b + gi for b, gi in zip(buf, g, strict=True)]
            theta = [t - lr * (gi + mu * b) for t, gi, b in zip(theta, g, buf, strict=True)]
            for r in range(3):  # the one that joins starts from theta too
                for p, t in zip(params[r], theta, strict=True):
                    p.copy_(t)
    return theta


def test_a_device_that_joins_becomes_a_replica_at_the_next_outer_step():
    torch.set_num_threads(1)
    job = elastic.ElasticJob(diloco=_job(), joins=(2,))  # arrives during step 2
    result = elastic.train(job, progress=False)
    # the outer step after step 3 admits it: three replicas from step 4 on
    assert result.replicas == [2, 2, 2, 2, 3, 3, 3, 3]
    assert any("device 2 joined: replica 2 from step 4" in e for e in result.events)
    ref = _hand_reference_with_join(job.diloco, join_after=3)
    worst = max((a - b).abs().max().item() for a, b in zip(result.params, ref, strict=True))
    assert worst < 1e-5, worst
    plain = diloco.train(_job(), progress=False)  # and it is not the 2-replica run
    assert max((a - b).abs().max().item() for a, b in zip(result.params, plain.params)) > 1e-4


def test_a_device_that_joins_a_full_job_is_a_spare_that_replaces_a_leaver(tmp_path):
    ck = str(tmp_path / "ck")
    full = diloco.train(_job(), progress=False)
    job = elastic.ElasticJob(
        diloco=_job(checkpoint_dir=ck, checkpoint_every=2),
        max_replicas=2,
        joins=(0,),
        kill=(0, 5),
    )
    result = elastic.train(job, progress=False)
    assert any("device 2 joined as a spare" in e for e in result.events), result.events
    assert any("spare device 2 takes it" in e for e in result.events), result.events
    assert result.replicas == [2] * 8
    worst = max((a - b).abs().max().item() for a, b in zip(result.params, full.params, strict=True))
    assert worst < 1e-6, worst


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--mode", "dp", "--backups", "1"], "--backups"),
        (["--mode", "diloco", "--join-id", "3"], "--join-id"),
        (["--mode", "diloco", "--max-replicas", "1"], "--max-replicas"),
        (["--mode", "diloco", "--kill", "x"], "--kill"),
        (["--mode", "diloco", "--join", "nohost"], "--join"),
        (["--mode", "diloco", "--join", "127.0.0.1:1"], "--join-id"),
        (["--max-replicas", "3"], "--max-replicas"),  # pipeline mode
    ],
)
def test_cli_rejects_bad_elastic_flags_before_forking(monkeypatch, args, flag):
    import moeflow.launch
    from moeflow.cli import geo as cli

    monkeypatch.setattr(moeflow.launch, "launch", lambda *a, **k: pytest.fail("forked"))
    with pytest.raises(ConfigError) as e:
        cli.main(["train", *args])
    assert e.value.field.startswith(flag), e.value


@pytest.mark.slow
def test_cli_a_device_joins_a_running_job_through_the_printed_broker(tmp_path):
    """``moeflow geo train --mode diloco --max-replicas 3`` prints its broker; a second
    command with ``--join`` becomes the third replica at an outer step."""
    import json
    import os
    import re
    import subprocess
    import sys
    import time

    flags = [
        "--mode", "diloco", "--replicas", "2", "--inner-steps", "2", "--dim", "16",
        "--layers", "1", "--heads", "2", "--seq-len", "8", "--microbatch-size", "1",
        "--microbatches", "1",
    ]  # fmt: skip
    out = tmp_path / "run.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moeflow.cli", "geo", "train", *flags]
    job = subprocess.Popen(
        [*cmd, "--steps", "3000", "--max-replicas", "3", "--json", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    first = job.stdout.readline()
    addr = re.search(r"broker at (\S+):", first).group(1)
    t0 = time.monotonic()
    joined = subprocess.run(
        [*cmd, "--steps", "3000", "--join", addr, "--join-id", "2"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    rest, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    assert joined.returncode == 0, joined.stderr[-3000:]
    assert time.monotonic() - t0 < 600
    doc = json.loads(out.read_text())
    assert doc["replicas"][0] == 2 and doc["replicas"][-1] == 3, doc["replicas"][-5:]
    k = doc["replicas"].index(3)
    assert k % 2 == 0  # right after an outer step (H = 2)
    assert f"device 2 joined: replica 2 from step {k}" in doc["events"]
