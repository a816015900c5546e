"""moeflow load (moeflow.apps.loadgen) against a live uvicorn serving the tiny Qwen3-MoE
checkpoint: token counts, ordered percentiles, TTFT <= latency, goodput at impossible and
loose SLOs, the Poisson schedule, flag validation (exit 2) and an unreachable URL (exit 1)."""

import json
import math
import statistics

import pytest

from moeflow.apps.loadgen import LoadConfig, poisson_schedule, run_load
from moeflow.cli import main

pytest.importorskip("httpx")


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("transformers")
    from moeflow.serving.engine import EngineConfig
    from moeflow.serving.openai_api import build_app, from_pretrained
    from tests.serving.conftest import make_checkpoint
    from tests.serving.serving_live import LiveServer

    path = tmp_path_factory.mktemp("loadgen_ckpt")
    make_checkpoint(path)
    server = from_pretrained(
        path, EngineConfig(block_size=4, max_seqs=8, max_prefill_tokens=32), "tiny"
    )
    with LiveServer(build_app(server)) as live:
        yield live.url


def _dead_url() -> str:
    from tests.serving.serving_live import free_port

    return f"http://127.0.0.1:{free_port()}"  # bound then closed: nothing listens


def _cfg(url, **kw) -> LoadConfig:
    base = dict(url=url, model="tiny", requests=6, input_len=8, output_len=10, vocab_size=64)
    return LoadConfig(**(base | kw))


STATS = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")


@pytest.mark.parametrize("rate", [math.inf, 40.0], ids=["inf", "poisson40"])
def test_report_counts_percentiles_and_latencies(url, rate):
    rep = run_load(_cfg(url, rate=rate, seed=3))
    assert rep["completed"] == 6 and rep["failed"] == 0, rep["errors"]
    assert rep["output_tokens"] == 6 * 10
    assert rep["input_tokens"] == 6 * 8
    for key in STATS:
        s = rep[key]
        assert 0 <= s["p50"] <= s["p90"] <= s["p99"], (key, s)
        assert s["mean"] > 0
    for r in rep["requests"]:
        assert r["ok"] and r["output_tokens"] == 10
        assert 0 < r["ttft_ms"] <= r["e2el_ms"]
        assert r["tpot_ms"] == pytest.approx((r["e2el_ms"] - r["ttft_ms"]) / 9)
        assert 1 <= r["chunks"] <= 10  # a token that decodes to no text sends no chunk
    assert rep["output_throughput"] == pytest.approx(60 / rep["duration_s"])
    assert rep["request_throughput"] == pytest.approx(6 / rep["duration_s"])
    assert max(r["e2el_ms"] for r in rep["requests"]) <= rep["duration_s"] * 1000 + 1e-6
    if math.isfinite(rate):  # the last request is sent no earlier than its scheduled time
        assert rep["duration_s"] >= poisson_schedule(6, rate, 3)[-1]
    assert rep["goodput"] is None


def test_goodput_zero_with_impossible_slo_and_throughput_with_loose(url):
    tight = run_load(_cfg(url, slo_ttft_ms=1e-6, slo_tpot_ms=1e-6))
    assert tight["completed"] == 6
    assert tight["goodput"] == 0 and tight["good_requests"] == 0
    loose = run_load(_cfg(url, slo_ttft_ms=1e9, slo_tpot_ms=1e9))
    assert loose["good_requests"] == 6
    assert loose["goodput"] == pytest.approx(loose["request_throughput"])
    assert loose["goodput"] > 0


def test_poisson_schedule_mean_and_determinism():
    rate = 5.0
    t = poisson_schedule(20000, rate, seed=7)
    assert t[0] == 0 and all(b >= a for a, b in zip(t, t[1:]))
    gaps = [b - a for a, b in zip(t, t[1:])]
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.03)
    # exponential gaps: standard deviation equals the mean
    assert statistics.pstdev(gaps) == pytest.approx(1 / rate, rel=0.05)
    assert poisson_schedule(50, rate, seed=7) == t[:50]
    assert poisson_schedule(50, rate, seed=8) != t[:50]
    assert poisson_schedule(4, math.inf, seed=7) == [0.0] * 4


BAD = [
    (["--rate", "0"], "--rate"),
    (["--rate", "-3"], "--rate"),
    (["--rate", "nan"], "--rate"),
    (["--requests", "0"], "--requests"),
    (["--input-len", "0"], "--input-len"),
    (["--output-len", "-1"], "--output-len"),
    (["--vocab-size", "0"], "--vocab-size"),
    (["--slo-ttft-ms", "5"], "--slo-ttft-ms/--slo-tpot-ms"),
    (["--slo-ttft-ms", "0", "--slo-tpot-ms", "5"], "--slo-ttft-ms"),
    (["--slo-ttft-ms", "5", "--slo-tpot-ms", "inf"], "--slo-tpot-ms"),
    (["--timeout", "0"], "--timeout"),
]


@pytest.mark.parametrize("extra,flag", BAD, ids=[f for _, f in BAD])
def test_bad_flags_exit_2_before_sending(capfd, extra, flag):
    # the URL is dead: a check that ran after the first request would exit 1, not 2
    code = main(["load", "--url", _dead_url(), "--model", "tiny", *extra])
    err = capfd.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and "ConfigError" in err and flag in err


def test_bad_url_scheme_and_unparsable_rate(capfd):
    assert main(["load", "--url", "localhost:8000", "--model", "tiny"]) == 2
    assert "--url" in capfd.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["load", "--url", "http://x", "--model", "tiny", "--rate", "fast"])
    assert e.value.code == 2


def test_unreachable_url_is_one_line_exit_1(capfd):
    dead = _dead_url()
    code = main(["load", "--url", dead, "--model", "tiny", "--requests", "2"])
    err = capfd.readouterr().err.strip()
    assert code == 1
    assert err.count("\n") == 0 and "cannot reach" in err and dead in err


def test_json_output_rules(url, tmp_path, capfd):
    out = tmp_path / "r.json"
    argv = ["load", "--url", url, "--model", "tiny", "--requests", "3", "--input-len", "5"]
    argv += ["--output-len", "4", "--vocab-size", "64", "--json", str(out)]
    assert main(argv) == 0
    assert "output throughput" in capfd.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["output_tokens"] == 12 and rep["config"]["rate"] == "inf"
    # an existing output needs --force, checked before any request (a dead URL would be 1)
    dead = [a if a != url else _dead_url() for a in argv]
    assert main(dead) == 2
    assert "--force" in capfd.readouterr().err
    assert json.loads(out.read_text()) == rep  # untouched
    assert main([*argv, "--force", "--seed", "1"]) == 0
    assert json.loads(out.read_text())["config"]["seed"] == 1
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_text_prompts_reach_input_len_with_a_character_tokenizer(url):
    rep = run_load(_cfg(url, prompt_text=True, requests=3, input_len=7, output_len=5))
    assert rep["completed"] == 3
    assert rep["input_tokens"] == 3 * 7 and rep["output_tokens"] == 3 * 5


@pytest.fixture(scope="module")
def strict_url():
    """A server that, like transformers serve, takes text prompts only and answers HTTP 422 to
    any field it does not know (vLLM's ``ignore_eos`` included); it streams 3 one-letter chunks,
    an empty finish chunk, then the usage."""
    fastapi = pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from fastapi import responses

    from tests.serving.serving_live import LiveServer

    known = {"model", "prompt", "max_tokens", "temperature", "stream", "stream_options"}
    app = fastapi.FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "strict"}]}

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        body = await request.json()
        extra = set(body) - known
        if extra or not isinstance(body.get("prompt"), str):
            return responses.JSONResponse({"detail": f"unexpected {sorted(extra)}"}, 422)

        def ev(text, finish=None, usage=None):
            d = {"choices": [] if usage else [{"text": text, "finish_reason": finish}]}
            if usage:
                d["usage"] = usage
            return f"data: {json.dumps(d)}\n\n"

        async def sse():
            for c in "abc":
                yield ev(c)
            yield ev("", "length")
            n = len(body["prompt"])
            yield ev("", usage={"prompt_tokens": n, "completion_tokens": 3, "total_tokens": n + 3})
            yield "data: [DONE]\n\n"

        return responses.StreamingResponse(sse(), media_type="text/event-stream")

    with LiveServer(app) as live:
        yield live.url


def test_servers_without_ignore_eos(strict_url, capfd):
    cfg = dict(model="strict", requests=3, input_len=6, output_len=3)
    rep = run_load(_cfg(strict_url, **cfg, prompt_text=True, ignore_eos=False))
    assert rep["completed"] == 3 and rep["output_tokens"] == 9 and rep["input_tokens"] == 18
    for r in rep["requests"]:
        assert r["chunks"] == 3  # the empty finish chunk is not a token
        assert r["ttft_ms"] <= r["e2el_ms"]
    # with ignore_eos (the default) every request is refused: counted, then one line, exit 1
    rep = run_load(_cfg(strict_url, **cfg, prompt_text=True))
    assert rep["completed"] == 0 and rep["failed"] == 3
    assert "HTTP 422" in rep["errors"][0] and "ignore_eos" in rep["errors"][0]
    argv = ["load", "--url", strict_url, "--model", "strict", "--requests", "2", "--prompt-text"]
    assert main(argv) == 1
    err = capfd.readouterr().err.strip()
    assert err.count("\n") == 0 and "LoadFailedError" in err and "HTTP 422" in err
    assert main([*argv, "--no-ignore-eos"]) == 0
