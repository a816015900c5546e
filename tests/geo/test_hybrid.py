"""A pipeline inside each site, DiLoCo between the sites (``--mode pipeline-diloco``): with one
replica, H = 1, outer lr 1 and momentum 0 it is plain training; with one stage it is the
plain DiLoCo path; with two stages it is DiLoCo over whole replicas."""

from __future__ import annotations

import json

import pytest
import torch

from moeflow.errors import ConfigError
from moeflow.geo import diloco
from moeflow.geo import pipeline as geo
from tests.geo.diloco_cases import SMALL


def _job(**kw) -> diloco.DilocoJob:
    return diloco.DilocoJob(**{**SMALL, "mode": "pipeline-diloco", **kw})


def _flat_sorted(params) -> torch.Tensor:
    """The parameters' values as one sorted vector: the stages hold the model's tensors in
    another order than the module, the values are the same."""
    return torch.cat([p.detach().reshape(-1) for p in params]).sort().values


def test_job_validation():
    with pytest.raises(ConfigError, match="stages"):
        diloco.DilocoJob(**SMALL, mode="diloco", stages=2)
    with pytest.raises(ConfigError, match="stages"):
        _job(stages=0)
    with pytest.raises(ConfigError, match="bounds"):
        _job(bounds=(0, 5, 5))
    with pytest.raises(ConfigError, match="replicas/stages"):
        _job(replicas=16, stages=5)
    with pytest.raises(ConfigError, match="steps"):
        _job(steps=7, inner_steps=3)
    assert _job(bounds=(0, 4, 9, 20)).stages == 3


def test_one_replica_h1_lr1_momentum0_two_stages_is_plain_training():
    job = _job(replicas=1, stages=2, inner_steps=1, outer_lr=1.0, outer_momentum=0.0, steps=6)
    result = diloco.train(job, progress=False)
    ref = geo.reference_losses(job.model_job())
    diff = max(abs(a - b) for a, b in zip(result.losses, ref, strict=True))
    assert diff < 1e-5, (diff, result.losses, ref)
    assert result.losses[-1] < result.losses[0]


def test_one_stage_equals_the_diloco_path_and_two_stages_equal_it_too():
    base = dict(replicas=2, inner_steps=3, steps=6)  # two outer steps: the momentum carries
    plain = diloco.train(diloco.DilocoJob(**SMALL, **base), progress=False)
    for stages in (1, 2):
        result = diloco.train(_job(stages=stages, **base), progress=False)
        # the same losses on each replica's shard, before and after the outer steps
        for mine, theirs in zip(result.replica_losses, plain.replica_losses, strict=True):
            diff = max(abs(a - b) for a, b in zip(mine, theirs, strict=True))
            assert diff < 1e-5, (stages, diff)
        worst = (_flat_sorted(result.params) - _flat_sorted(plain.params)).abs().max().item()
        assert worst < 1e-6, (stages, worst)
        # one all-reduce per outer step of all the stages' parameters: the model's bytes
        assert result.param_bytes == plain.param_bytes
        assert result.allreduce_bytes == [plain.param_bytes] * 2
        assert len(result.utilization) == 2 * stages
        assert all(0 < u <= 1 for u in result.utilization), result.utilization
    assert plain.replica_losses[0] != plain.replica_losses[1]  # two shards


def test_cli_pipeline_diloco_from_device_sites(tmp_path, capsys):
    from moeflow.cli import geo as cli

    out = tmp_path / "run.json"
    rc = cli.main([
        "train", "--mode", "pipeline-diloco", "--devices",
        "tests/geo/data/geo_3sites_6devices.json", "--stages", "2", "--steps", "2",
        "--inner-steps", "2", "--dim", "32", "--layers", "1", "--heads", "2", "--seq-len", "16",
        "--microbatch-size", "2", "--microbatches", "2", "--json", str(out), "--force-nproc",
    ])  # fmt: skip
    assert rc == 0
    doc = json.loads(out.read_text())
    assert (doc["job"]["replicas"], doc["job"]["stages"]) == (3, 2)  # sites A, B, C
    assert doc["allreduce_bytes"] == [doc["param_bytes"]]
    assert len(doc["utilization"]) == 6
    assert "3 replicas x 2 stages, 1 all-reduces" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args,flag",
    [
        (["--mode", "pipeline-diloco", "--stages", "0"], "--stages"),
        (["--mode", "pipeline-diloco", "--backups", "1"], "--backups"),
        (["--mode", "diloco", "--stages", "2"], "--stages"),
        (["--mode", "pipeline-diloco", "--replicas", "20", "--stages", "4"], "--replicas"),
    ],
)
def test_cli_rejects_bad_flags_before_forking(monkeypatch, args, flag):
    import moeflow.launch
    from moeflow.cli import geo as cli

    monkeypatch.setattr(moeflow.launch, "launch", lambda *a, **k: pytest.fail("forked"))
    with pytest.raises(ConfigError) as e:
        cli.main(["train", *args])
    assert e.value.field.startswith(flag), e.value
