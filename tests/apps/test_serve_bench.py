"""serve-bench: vLLM's metric definitions on hand-made timestamps, a tiny end-to-end run with
--json, and flags refused with typed errors before any rank starts."""

import argparse
import json

import pytest

from moeflow.apps.serve_bench import (
    add_serve_bench_arguments,
    request_set,
    run_serve_bench,
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
    with pytest.raises(InputError):
        summarize([GenerationResult(0, 1)], ServeSchedule.naive())


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
            "--no-progress",
        )
    )
    assert rc == 0
    rec = json.loads(out.read_text())
    assert [r["schedule"] for r in rec["results"]] == ["naive", "pppipe", "findep"]
    for r in rec["results"]:
        assert r["output_tokens"] == sum(
            request_set(
                parse("--requests", "3", "--prompt-len", "4:8", "--output-len", "3:4"), 2048, 1024
            )[i].params.max_new_tokens
            for i in range(3)
        )
        assert r["output_tok_s"] > 0 and r["ttft_ms"][0] > 0
    out = capsys.readouterr().out
    assert "| findep |" in out and "FinDEP solver: prefill r1=" in out
    assert rec["results"][0]["predicted_prefill_ms"] > 0


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
            "--findep",
            "manual",
            "--r1",
            "2",
            "--r2",
            "3",
            "--order",
            "ASAS",
            "--no-progress",
        )
    )
    assert rc == 0
    assert "| findep | 2 / 3 / ASAS | same |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, err, word",
    [
        (("--schedules", "naive,fast"), ConfigError, "--schedules"),
        (("--prompt-len", "9:3"), ConfigError, "--prompt-len"),
        (("--output-len", "x"), ConfigError, "--output-len"),
        (("--requests", "0"), ConfigError, "--requests"),
        (("--r2", "0"), ConfigError, "--r2"),
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
