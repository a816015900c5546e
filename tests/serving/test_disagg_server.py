"""``moeflow serve --ag N --eg M``: each rank loads only its part of the checkpoint (attention
ranks hold no routed-expert weight), greedy tokens over HTTP equal ``generate()``, and a dead
expert rank fails the requests in flight with a 503 naming it, turns ``/health`` 503, and
does not hang the server."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moeflow.cli import main
from moeflow.models import Request, SamplingParams, generate
from tests.serving.serving_live import wait_healthy

SRC = str(Path(__file__).resolve().parents[2] / "src")


@pytest.fixture(scope="module")
def full(checkpoint):
    from moeflow.checkpoint import load_pretrained

    return load_pretrained(checkpoint[1])


@pytest.fixture(scope="module")
def fused_bf16(checkpoint, full, tmp_path_factory):
    """The checkpoint with each layer's experts fused (``experts.gate_up_proj`` (E, 2F, D),
    ``experts.down_proj`` (E, D, F)), every tensor stored in bfloat16."""
    from safetensors.torch import load_file, save_file

    src = checkpoint[1]
    out = tmp_path_factory.mktemp("fused_bf16")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    sd = load_file(str(src / "model.safetensors"))
    E = full.cfg.moe.num_experts
    fused = {}
    for i in range(full.cfg.num_layers):
        p = f"model.layers.{i}.mlp.experts."
        ups = [
            torch.cat([sd.pop(f"{p}{e}.gate_proj.weight"), sd.pop(f"{p}{e}.up_proj.weight")])
            for e in range(E)
        ]
        fused[p + "gate_up_proj"] = torch.stack(ups)
        fused[p + "down_proj"] = torch.stack([sd.pop(f"{p}{e}.down_proj.weight") for e in range(E)])
    sd.update(fused)
    save_file(
        {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()},
        str(out / "model.safetensors"),
    )
    return out


def test_attention_part_holds_no_expert_weight(checkpoint, full):
    from moeflow.serving.disagg_weights import (
        expert_weight_bytes,
        load_attention_part,
        module_bytes,
    )

    model, read = load_attention_part(checkpoint[1])
    assert expert_weight_bytes(full) > 0
    assert expert_weight_bytes(model) == 0
    assert not [n for n, _ in model.named_parameters() if ".experts." in n]
    assert all(layer.mlp.experts is None for layer in model.layers)
    ref = full.state_dict()
    ours = model.state_dict()
    assert set(ref) - set(ours) == {k for k in ref if ".mlp.experts." in k}
    for k, v in ours.items():
        assert torch.equal(v, ref[k]), k
    # it read the dense tensors and nothing else (the rotary table is computed, not read)
    assert read == module_bytes(model) - model.rotary.inv_freq.numel() * 4
    size = (checkpoint[1] / "model.safetensors").stat().st_size
    assert read < size - expert_weight_bytes(full)


@pytest.mark.parametrize("layout", ["per-expert fp32", "fused bf16"])
def test_expert_part_reads_only_its_experts(checkpoint, full, fused_bf16, layout):
    from moeflow.serving.disagg_weights import load_attention_part, load_expert_part, module_bytes

    path = checkpoint[1] if layout == "per-expert fp32" else fused_bf16
    stored = torch.float32 if layout == "per-expert fp32" else torch.bfloat16
    cfg, experts, read = load_expert_part(path, 2, 4, torch.float32)
    assert [x.num_experts for x in experts] == [2] * cfg.num_layers
    for layer, x in zip(full.layers, experts):
        assert torch.equal(x.w_in, layer.mlp.experts.w_in[2:4].to(stored).float())
        assert torch.equal(x.w_out, layer.mlp.experts.w_out[2:4].to(stored).float())
    held = sum(module_bytes(x) for x in experts)
    assert read == held * stored.itemsize // 4  # its experts' stored bytes, no more
    if layout == "fused bf16":  # the dense part converts as load_pretrained converts it
        from moeflow.checkpoint import load_pretrained

        model, _ = load_attention_part(path, torch.bfloat16)
        ref = load_pretrained(path, torch.bfloat16).state_dict()
        for k, v in model.state_dict().items():
            assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k]), k
        assert torch.equal(
            model.rotary.inv_freq, load_pretrained(path, torch.bfloat16).rotary.inv_freq
        )


@pytest.fixture(scope="module")
def disagg(checkpoint):
    """(OpenAIServer over 1 attention + 2 expert ranks, base URL)."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from moeflow.serving.disagg_server import disaggregated_server
    from moeflow.serving.engine import EngineConfig
    from moeflow.serving.openai_api import build_app
    from tests.serving.serving_live import LiveServer

    server = disaggregated_server(
        checkpoint[1],
        EngineConfig(block_size=4, max_seqs=8, max_prefill_tokens=16),
        "tiny",
        ag=1,
        eg=2,
        timeout_s=20,
    )
    try:
        with LiveServer(build_app(server)) as live:
            yield server, live.url
    finally:
        server.engine.shutdown(drain=False)


def test_ranks_hold_their_parts_only(disagg, full):
    from moeflow.serving.disagg_weights import expert_weight_bytes

    info = disagg[0].engine.rank_info
    assert info[0]["role"] == "attention" and info[0]["expert_bytes"] == 0
    total = expert_weight_bytes(full)
    assert [info[r]["expert_bytes"] for r in (1, 2)] == [total // 2, total // 2]
    assert [info[r]["bytes_read"] for r in (1, 2)] == [total // 2, total // 2]


def test_greedy_tokens_over_http_equal_generate(disagg, full):
    import concurrent.futures as cf

    import httpx

    _, url = disagg
    prompts = [[5, 6, 7, 8, 9][: 2 + i % 4] + [10 + i] for i in range(6)]
    lens = [4, 12, 7, 20, 9, 15]

    def ask(i):
        from tests.serving.serving_live import greedy_token_ids

        return greedy_token_ids(url, prompts[i], lens[i])

    with cf.ThreadPoolExecutor(6) as pool:
        got = list(pool.map(ask, range(6)))
    ref = generate(full, [Request(p, SamplingParams(n)) for p, n in zip(prompts, lens)])
    assert got == [r.tokens for r in ref]
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and [r["role"] for r in health["ranks"]] == [
        "attention",
        "expert",
        "expert",
    ]


def test_streamed_chat_equals_the_non_streamed_text(disagg):
    import httpx

    _, url = disagg
    body = {"messages": [{"role": "user", "content": "hi there"}], "max_tokens": 10}
    body["temperature"] = 0
    whole = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60).json()
    text = []
    with httpx.stream(
        "POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    assert "".join(text) == whole["choices"][0]["message"]["content"]


def test_a_client_that_goes_away_frees_its_blocks(disagg):
    import httpx

    server, url = disagg
    body = {"prompt": [5, 6], "max_tokens": 80, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # hang up after the first token
    deadline = time.monotonic() + 20
    while True:  # the attention rank dropped the request and reports its pool whole again
        h = httpx.get(f"{url}/health").json()
        if h["running"] == 0 and h["free_kv_blocks"] == server.engine.num_blocks:
            break
        assert time.monotonic() < deadline, h
        time.sleep(0.1)
    assert not server.engine._inflight


def _stream_tokens(url, n, started):
    import httpx

    body = {"prompt": [5, 6, 7], "max_tokens": n, "stream": True, "ignore_eos": True}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        if r.status_code != 200:  # failed before its first token: an HTTP error
            r.read()
            started.set()
            return [{"status": r.status_code, **r.json()}]
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                started.set()
    return events


@pytest.mark.parametrize("dead", [2, 0], ids=["expert rank", "attention rank"])
def test_a_dead_rank_fails_requests_in_flight(checkpoint, dead):
    import concurrent.futures as cf
    import threading

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("fastapi")
    from moeflow.serving.disagg_server import disaggregated_server
    from moeflow.serving.engine import EngineConfig
    from moeflow.serving.openai_api import build_app
    from tests.serving.serving_live import LiveServer

    server = disaggregated_server(
        checkpoint[1], EngineConfig(block_size=4, max_seqs=8), "tiny", ag=1, eg=2, timeout_s=20
    )
    eng = server.engine
    try:
        with LiveServer(build_app(server)) as live:
            started = threading.Event()
            with cf.ThreadPoolExecutor(2) as pool:
                futs = [pool.submit(_stream_tokens, live.url, 90, started) for _ in range(2)]
                assert started.wait(30)
                t_kill = time.monotonic()
                os.kill(eng.pids[dead], signal.SIGKILL)
                streams = [f.result(30) for f in futs]
            waited = time.monotonic() - t_kill
            name = f"{'expert' if dead else 'attention'} rank {dead}"
            for events in streams:  # an error event in the stream, or a 503 before it
                assert events[-1].get("status", 503) == 503
                err = events[-1]["error"]
                assert name in err["message"] and "SIGKILL" in err["message"]
                assert err["type"] == "service_unavailable"
                assert len(events) < 90  # it did not finish
            assert waited < 10  # the deadline is 20 s: the death was noticed, not waited out
            h = httpx.get(f"{live.url}/health")
            assert h.status_code == 503
            assert h.json()["dead_ranks"][0]["rank"] == dead
            assert not h.json()["ranks"][dead]["alive"]
            r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "ab", "max_tokens": 2})
            assert r.status_code == 503 and name in r.json()["error"]["message"]
            t0 = time.monotonic()
    finally:
        eng.shutdown(drain=True)
    assert time.monotonic() - t0 < 15
    assert all(p.exitcode is not None for p in eng._procs)


def test_cli_layout_errors_are_bad_input(capsys, checkpoint):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    assert main(["serve", str(checkpoint[1]), "--port", "0", "--ag", "1"]) == 2
    assert "--eg" in capsys.readouterr().err
    assert main(["serve", str(checkpoint[1]), "--port", "0", "--eg", "4"]) == 2
    assert "does not divide num_experts=6" in capsys.readouterr().err
    assert main(["serve", str(checkpoint[1]), "--port", "0", "--eg", "2", "--device", "mps"]) == 2
    assert "cpu (gloo ranks) or cuda" in capsys.readouterr().err


def test_nccl_ranks_are_checked_before_any_rank_starts(checkpoint, monkeypatch):
    """device="cuda": one NCCL rank per GPU, refused by name where the GPUs are too few; a
    solved schedule needs its costs given (the start-up measurement times the CPU)."""
    import torch.distributed as dist

    from moeflow.errors import ConfigError, DistributedConfigError
    from moeflow.serving.disagg_server import DisaggregatedEngine, check_device

    with pytest.raises(ConfigError, match="device"):
        DisaggregatedEngine(checkpoint[1], eg=2, device="tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    with pytest.raises(DistributedConfigError, match="3 ranks need 3 GPUs, this host has 2"):
        DisaggregatedEngine(checkpoint[1], ag=1, eg=2, device="cuda")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    with pytest.raises(ConfigError, match="costs measured at start time the CPU"):
        check_device("cuda", 3, "findep", None, None)
    check_device("cuda", 3, "naive", None, None)  # enough GPUs, nothing to measure


@pytest.mark.slow
def test_cli_serves_disaggregated_and_drains_on_sigterm(checkpoint, full):
    httpx = pytest.importorskip("httpx")
    from tests.serving.serving_live import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moeflow.cli", "serve", str(checkpoint[1]), "--port", str(port)]
    cmd += ["--ag", "2", "--eg", "2", "--schedule", "pppipe", "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc, url, poll_s=0.2)
        pids = [r["pid"] for r in httpx.get(f"{url}/health").json()["ranks"]]
        body = {"prompt": [3, 4, 5], "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        got = [
            httpx.post(
                f"{url}/v1/completions", json={**body, "return_token_ids": True}, timeout=60
            ).json()["choices"][0]["token_ids"]
            for _ in range(2)  # one on each attention rank
        ]
        ref = generate(full, [Request([3, 4, 5], SamplingParams(16))])[0].tokens
        assert got == [ref, ref]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 143
    for pid in pids:  # every rank is gone
        assert (
            not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        )
