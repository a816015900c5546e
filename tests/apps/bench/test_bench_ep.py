"""Expert parallelism on 2 forked gloo ranks: dispatch / experts / combine and the waits."""

import json

import pytest

from moeflow.apps.bench import BenchJob, Setting, Shape, bench, validate_report

TINY = {
    "dim": 32,
    "num_layers": 1,
    "num_heads": 4,
    "num_experts": 4,
    "top_k": 2,
    "ffn_hidden_size": 64,
}


@pytest.mark.dist
def test_ep_train_step_on_two_ranks(tmp_path):
    job = BenchJob(
        kind="demo",
        mode="train",
        shape=Shape(batch=4, seq_len=16),
        dims=TINY,
        settings=[Setting()],
        warmup=1,
        steps=2,
        unprofiled=1,
        nproc=2,
        r=2,
        peak_flops={"float32": 1e11},
        progress=False,
        trace_dir=str(tmp_path),
    )
    rep = bench(job)
    validate_report(rep)
    s = rep["settings"][0]
    assert s["status"] == "ok", s["error"]
    ep = s["ep"]
    assert ep["world_size"] == 2 and ep["r"] == 2 and len(ep["step_ms_per_rank"]) == 2
    assert set(ep["phases"]) == {"forward", "backward"}
    for p in ("forward", "backward"):
        ph = ep["phases"][p]
        assert ph["comm_ms"] > 0 and ph["experts_ms"] > 0
        assert ph["dispatch_wait_ms"] > 0 and ph["combine_wait_ms"] > 0
        assert 0.0 <= ph["hidden_fraction"] <= 1.0
    # one trace per rank, each with its rank
    files = sorted(tmp_path.glob("*/rank*.json"))
    assert [json.loads(f.read_text())["distributedInfo"]["rank"] for f in files] == [0, 1]
