"""serve-bench: vLLM's metric definitions (goodput included) on hand-made timestamps, rounds in
random order, a tiny end-to-end run with --json, and flags refused with typed errors before any
rank starts."""

import argparse
import json

import pytest

from moeflow.apps.serve_bench import (
    add_serve_bench_arguments,
    request_set,
    run_rounds,
    run_serve_bench,
    speedups,
    summarize,
)
from moeflow.errors import ConfigError, DistributedConfigError, InputError
from moeflow.models.generate import GenerationResult
from moeflow.serving.disaggregated import ServeSchedule


def parse(*argv):
    return add_serve_bench_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_metrics_follow_vllm_definitions():
    a = GenerationResult(0, 5, tokens=[1, 2, 3], start_time=10.0, token_times=[10.1, 10.3, 10.5])
    b = GenerationResult(1, 5, tokens=[4], start_time=10.0, token_times=[10.2])
    m = summarize([a, b], ServeSchedule.naive())
    assert m.output_tokens == 4 and m.duration_s == pytest.approx(0.5)
    assert m.output_tok_s == pytest.approx(8.0)
    assert m.ttft_ms[0] == pytest.approx(150.0)  # mean of 100 and 200 ms
    assert m.ttft_ms[2] == pytest.approx(199.0)  # p99, linear
    assert m.tpot_ms == pytest.approx((200.0, 200.0, 200.0))  # (500 - 100) / 2; b has 1 token
    assert m.goodput_req_s is None  # no SLO, no goodput
    with pytest.raises(InputError):
        summarize([GenerationResult(0, 1)], ServeSchedule.naive())


def test_goodput_counts_requests_within_every_slo():
    a = GenerationResult(0, 5, tokens=[1, 2, 3], start_time=10.0, token_times=[10.1, 10.3, 10.5])
    b = GenerationResult(1, 5, tokens=[4], start_time=10.0, token_times=[10.2])
    sched = ServeSchedule.naive()
    # a: TTFT 100, TPOT 200; b: TTFT 200, TPOT 0 (one token); duration 0.5 s
    assert summarize([a, b], sched, 150.0, None).goodput_req_s == pytest.approx(2.0)
    assert summarize([a, b], sched, 250.0, 100.0).good_requests == 1
    assert summarize([a, b], sched, 250.0, 201.0).goodput_req_s == pytest.approx(4.0)
    assert summarize([a, b], sched, 50.0, 500.0).good_requests == 0


def test_steps_are_set_against_the_prediction():
    a = GenerationResult(0, 5, tokens=[1, 2], start_time=0.0, token_times=[0.1, 0.2])
    steps = [
        {"seqs": 1, "tokens": 5, "r1": 1, "r2": 2, "order": "AASS", "ms": 90.0},
        {"seqs": 1, "tokens": 1, "r1": 1, "r2": 1, "order": "ASAS", "ms": 30.0},
    ]
    m = summarize([a], ServeSchedule("findep"), steps=steps, predict=lambda b, t, *_: 10.0 * t)
    assert (m.r1, m.r2, m.order, m.decode) == (1, 2, "AASS", (1, 1, "ASAS"))
    assert m.prefill_ratio == pytest.approx(90 / 50) and m.decode_ratio == pytest.approx(3.0)


def test_rounds_run_every_schedule_once_in_varying_order():
    scheds = [ServeSchedule.naive(), ServeSchedule.pppipe(), ServeSchedule("findep", 2, 2)]
    ran = []

    def serve_once(s):
        ran.append(s.name)
        k = len(ran)
        r = GenerationResult(0, 1, tokens=[1, 2], start_time=0.0, token_times=[0.1, 0.1 + k])
        return [r], []

    order, runs = run_rounds(
        serve_once, scheds, 6, 0, lambda res, s, st: summarize(res, s, None, 1e7)
    )
    assert [n for rnd in order for n in rnd] == ran
    assert all(sorted(rnd) == ["findep", "naive", "pppipe"] for rnd in order)
    assert len({tuple(rnd) for rnd in order}) > 1  # not one fixed order
    assert all(len(ms) == 6 for ms in runs.values())
    sp = speedups(runs)
    assert set(sp) == {"goodput", "output_tok_s"} and sp["output_tok_s"] > 0


def test_request_set_is_fixed_by_the_seed():
    args = parse("--requests", "5", "--prompt-len", "3:9", "--output-len", "2:4")
    r1, r2 = request_set(args, 100, 64), request_set(args, 100, 64)
    assert [r.prompt for r in r1] == [r.prompt for r in r2]
    assert all(3 <= len(r.prompt) <= 9 and 2 <= r.params.max_new_tokens <= 4 for r in r1)
    other = request_set(parse("--requests", "5", "--seed", "1"), 100, 256)
    assert [r.prompt for r in other] != [r.prompt for r in r1]


def test_tiny_run_writes_json(tmp_path, capsys):
    out = tmp_path / "rec.json"
    rc = run_serve_bench(
        parse(
            "--requests",
            "3",
            "--prompt-len",
            "4:8",
            "--output-len",
            "3:4",
            "--demo-layers",
            "1",
            "--demo-hidden",
            "32",
            "--eg",
            "2",
            "--json",
            str(out),
            "--repeat",
            "2",
            "--slo-tpot-ms",
            "1000",
            "--no-progress",
        )
    )
    assert rc == 0
    rec = json.loads(out.read_text())
    assert list(rec["runs"]) == ["naive", "pppipe", "findep"]
    assert rec["repeat"] == 2 and all(sorted(o) == sorted(rec["runs"]) for o in rec["order"])
    for r in (r for rs in rec["runs"].values() for r in rs):
        assert r["output_tokens"] == sum(
            request_set(
                parse("--requests", "3", "--prompt-len", "4:8", "--output-len", "3:4"), 2048, 1024
            )[i].params.max_new_tokens
            for i in range(3)
        )
        assert r["output_tok_s"] > 0 and r["ttft_ms"][0] > 0
        assert r["predicted_prefill_ms"] > 0 and r["measured_decode_ms"] > 0
        assert r["goodput_req_s"] is not None
        # one prefill step and one decode step per token after the first of the longest
        assert len(r["steps"]) == 1 + 3
    out = capsys.readouterr().out
    assert "| findep |" in out and "FinDEP solver: prefill r1=" in out


def test_manual_findep_schedule(capsys):
    rc = run_serve_bench(
        parse(
            "--requests",
            "2",
            "--prompt-len",
            "3:4",
            "--output-len",
            "2:2",
            "--demo-layers",
            "1",
            "--demo-hidden",
            "32",
            "--schedules",
            "findep",
            "--plan",
            "manual",
            "--r1",
            "2",
            "--r2",
            "3",
            "--order",
            "ASAS",
            "--repeat",
            "1",
            "--no-progress",
        )
    )
    assert rc == 0
    assert "| findep | 2/3/ASAS | 2/3/ASAS |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, err, word",
    [
        (("--schedules", "naive,fast"), ConfigError, "--schedules"),
        (("--prompt-len", "9:3"), ConfigError, "--prompt-len"),
        (("--output-len", "x"), ConfigError, "--output-len"),
        (("--requests", "0"), ConfigError, "--requests"),
        (("--r2", "0"), ConfigError, "--r2"),
        (("--slo-ttft-ms", "-1"), ConfigError, "--slo-ttft-ms"),
        (
            (
                "--eg",
                "3",
            ),
            DistributedConfigError,
            "eg=3",
        ),
        (("--json", "/nonexistent-dir/x.json"), InputError, "--json"),
        (("--model", "/nonexistent-dir"), InputError, "config.json"),
    ],
)
def test_bad_flags_are_typed_errors(argv, err, word):
    with pytest.raises(err, match=word):
        run_serve_bench(parse(*argv, "--no-progress"))


def test_link_fit_takes_latency_from_small_and_bandwidth_from_large_messages():
    from moeflow.serving.host_costs import LINK_SIZES, fit_link

    # a token-bucket link: 2 ms per message, 1e-4 ms/B once the bucket is drained, and the
    # small messages through the burst at line rate
    ms = [2.0 + (1e-6 if n <= 64 << 10 else 1e-4) * n for n in LINK_SIZES]
    c = fit_link(LINK_SIZES, ms, note="toy")
    assert c.beta == pytest.approx(1e-4, rel=1e-9)
    assert c.alpha == pytest.approx(2.0 - (1e-4 - 1e-6) * (4 << 10), rel=1e-6)
    with pytest.raises(InputError):
        fit_link([1024, 1 << 20], [1.0, 2.0], note="toy")


def _perf_file(tmp_path, drop=None):
    from moeflow.perf.cost import LinearCost, PerfModel

    costs = {
        "gemm": LinearCost(0.01, 1e-8),
        "gemm@float32": LinearCost(0.01, 1e-8),
        "expert_fwd@float32": LinearCost(0.12, 3e-8),
        "attention@float32": LinearCost(0.05, 4e-8),
        "send": LinearCost(0.1, 1e-6),
    }
    costs.pop(drop, None)
    path = tmp_path / "perf.json"
    PerfModel("prof", costs, meta={"expert_experts": 4, "world_size": 2}).save(path)
    return path


def test_perf_file_replaces_the_measured_costs(tmp_path, capsys):
    from moeflow.plan import findep as fd

    out = tmp_path / "rec.json"
    argv = ["--requests", "2", "--prompt-len", "4:6", "--output-len", "2:3", "--demo-layers"]
    argv += ["1", "--demo-hidden", "32", "--repeat", "1", "--no-progress", "--json", str(out)]
    assert run_serve_bench(parse(*argv, "--perf", str(_perf_file(tmp_path)))) == 0
    rec = json.loads(out.read_text())
    # one set of costs (none measured per round): FinDEP's testbed of the profile
    assert len(rec["costs"]) == 1
    from moeflow.perf import PerfModel

    tb = fd.testbed_from_perf(PerfModel.load(_perf_file(tmp_path)), ag=1, eg=1)
    assert rec["costs"][0]["gemm"]["alpha_ms"] == pytest.approx(tb.gemm.alpha)
    assert rec["costs"][0]["link"]["beta_ms"] == pytest.approx(1e-6)
    assert all(r["predicted_prefill_ms"] > 0 for rs in rec["runs"].values() for r in rs)
    assert "R^2 -" in capsys.readouterr().out


def test_perf_file_without_a_cost_is_refused_by_name(tmp_path):
    from moeflow.errors import ConfigError

    argv = ["--requests", "2", "--demo-layers", "1", "--demo-hidden", "32", "--no-progress"]
    with pytest.raises(ConfigError, match="send"):
        run_serve_bench(parse(*argv, "--perf", str(_perf_file(tmp_path, drop="send"))))
