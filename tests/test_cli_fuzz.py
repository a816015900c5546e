"""Argument fuzzing of ``plan`` / ``simulate`` / ``train`` validation (hypothesis).

Each generated value either passes validation (and then lies in the documented range) or
raises a typed one-line error naming the flag; nothing else (no traceback, no silent default).
The parse + validate functions run in-process; a few subprocess checks cover the error
boundary's exit code and single stderr line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moeflow.cli import plan as plan_cli
from moeflow.cli import simulate as sim_cli
from moeflow.errors import ConfigError, DistributedConfigError, InputError, MoeflowError
from moeflow.plan import io as plan_io

FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

# ints around every boundary: 0, negatives, small, the caps, and far beyond any cap
INTS = st.one_of(
    st.integers(-3, 3),
    st.integers(-(10**6), 10**6),
    st.sampled_from(
        [
            plan_cli.MAX_DEGREE,
            plan_cli.MAX_DEGREE + 1,
            plan_cli.MAX_LAYERS,
            plan_cli.MAX_LAYERS + 1,
            10**6,
            2**31,
            2**63,
            10**30,
        ]
    ),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, -1.0, 1e-300, 1e300, math.nan, math.inf]),
)


def _parse(adder, argv):
    p = argparse.ArgumentParser()
    adder(p)
    return p.parse_args(argv)


def _one_line(e: Exception, flag: str) -> None:
    text = str(e)
    assert "\n" not in text and flag in text, text


PLAN_INT_FLAGS = {
    # flag: (attribute, valid(v))
    "--r-max": ("r_max", lambda v: 1 <= v <= plan_cli.MAX_DEGREE),
    "--tutel-r": ("tutel_r", lambda v: 1 <= v <= plan_cli.MAX_DEGREE),
    "--layers": ("layers", lambda v: 1 <= v <= plan_cli.MAX_LAYERS),
    "--nodes": ("nodes", lambda v: 1 <= v <= plan_cli.MAX_NODES),
    "--tokens": ("tokens", lambda v: 1 <= v <= plan_cli.MAX_TOKENS),
    "--seq-len": ("seq_len", lambda v: 1 <= v <= 8192),  # at most --tokens (8192)
    # an ESP group lives inside one node: 8 GPUs per node on fsmoe-testbed-a
    "--esp": ("esp", lambda v: v >= 1 and 8 % v == 0),
}


@FUZZ
@given(flag=st.sampled_from(sorted(PLAN_INT_FLAGS)), v=INTS)
def test_plan_int_flags(flag, v):
    attr, valid = PLAN_INT_FLAGS[flag]
    args = _parse(plan_cli.add_plan_arguments, [f"{flag}={v}"])
    try:
        plan_cli.validate_plan_args(args)
        workloads, *_ = plan_cli.setup(args)  # layout checks (--esp) live here
    except (ConfigError, DistributedConfigError) as e:
        assert not valid(v), f"{flag} {v} refused: {e}"
        _one_line(e, flag)
        return
    assert valid(v), f"{flag} {v} accepted"
    assert getattr(args, attr) == v  # never silently replaced by a default
    if flag == "--layers":
        assert len(workloads) == v
    if flag == "--esp":
        assert workloads[0].n_esp == v


@FUZZ
@given(v=FLOATS)
def test_plan_lina_chunk_mb(v):
    args = _parse(plan_cli.add_plan_arguments, [f"--lina-chunk-mb={v!r}"])
    if math.isfinite(v) and v > 0:
        plan_cli.validate_plan_args(args)
    else:
        with pytest.raises(ConfigError) as ei:
            plan_cli.validate_plan_args(args)
        _one_line(ei.value, "--lina-chunk-mb")


@FUZZ
@given(
    flag=st.sampled_from(
        ["--r-max", "--tutel-r", "--layers", "--nodes", "--esp", "--seq-len", "--tokens"]
    ),
    v=INTS,
)
def test_simulate_int_flags(flag, v):
    attr, valid = PLAN_INT_FLAGS[flag]
    args = _parse(sim_cli.add_simulate_arguments, [f"{flag}={v}"])
    try:
        sim_cli.validate_simulate_args(args)
        plan_cli.setup(args)
    except (ConfigError, DistributedConfigError) as e:
        assert not valid(v), f"{flag} {v} refused: {e}"
        _one_line(e, flag)
        return
    assert valid(v) and getattr(args, attr) == v


TRAIN_INT_FLAGS = {
    "--steps": lambda v: v >= 1,
    "--batch-size": lambda v: 1 <= v <= 4096,
    "--seq-len": lambda v: 1 <= v <= 65536,  # the 1 MB corpus holds a sequence of them all
    "--dim": lambda v: 1 <= v <= 8192 and v % 4 == 0,  # 4 attention heads
    "--layers": lambda v: 1 <= v <= 128,
    "--experts": lambda v: 2 <= v <= 1024,  # top-k 2
    "--top-k": lambda v: 1 <= v <= 8,  # 8 experts
    "--ffn": lambda v: 1 <= v <= 65536,
    "--log-every": lambda v: v >= 1,
    "--threads": lambda v: v >= 1,
    "--r-fwd": lambda v: v >= 1,
    "--esp": lambda v: v >= 1,
    "--ranks-per-node": lambda v: v >= 0,
}


@FUZZ
@given(flag=st.sampled_from(sorted(TRAIN_INT_FLAGS)), v=INTS)
def test_train_int_flags(flag, v):
    from moeflow.apps.train import add_train_arguments, validate_train_args

    args = _parse(add_train_arguments, [f"{flag}={v}"])
    valid = TRAIN_INT_FLAGS[flag](v)
    try:
        validate_train_args(args)
    except ConfigError as e:
        assert not valid, f"{flag} {v} refused: {e}"
        assert "\n" not in str(e)
        return
    assert valid, f"{flag} {v} accepted"


@FUZZ
@given(
    flag=st.sampled_from(
        ["--lr", "--max-seconds", "--timeout", "--aux-loss-coef", "--capacity-factor"]
    ),
    v=FLOATS,
)
def test_train_float_flags(flag, v):
    from moeflow.apps.train import add_train_arguments, validate_train_args

    args = _parse(add_train_arguments, [f"{flag}={v!r}"])
    valid = math.isfinite(v) and (v >= 0 if flag == "--aux-loss-coef" else v > 0)
    if valid:
        validate_train_args(args)
    else:
        with pytest.raises(ConfigError) as ei:
            validate_train_args(args)
        _one_line(ei.value, flag)


@FUZZ
@given(v=INTS)
def test_train_nproc(v):
    from moeflow.apps.train import add_train_arguments, validate_train_args
    from moeflow.launch import max_ranks

    args = _parse(add_train_arguments, [f"--nproc={v}", "--batch-size", "840", "--experts", "840"])
    try:
        validate_train_args(args)
    except (ConfigError, DistributedConfigError) as e:
        # 0 and negatives no longer mean "one rank"; above the cap needs --force-nproc
        if isinstance(e, ConfigError):
            assert not 1 <= v <= max_ranks()
            _one_line(e, "--nproc")
        return
    assert 1 <= v <= max_ranks() and args.nproc == v


@pytest.mark.parametrize(
    "flag", ["--nodes", "--layers", "--esp", "--seq-len", "--r-max", "--tutel-r", "--tokens"]
)
@pytest.mark.parametrize("v", ["0", "-1"])
def test_plan_zero_and_negative_no_longer_mean_default(flag, v):
    # `x or default` used to turn 0 into the default silently
    args = _parse(plan_cli.add_plan_arguments, [f"{flag}={v}"])
    with pytest.raises(ConfigError) as ei:
        plan_cli.validate_plan_args(args)
    _one_line(ei.value, flag)


def test_esp_3_with_8_gpus_per_node_is_refused():
    args = _parse(plan_cli.add_plan_arguments, ["--esp", "3"])  # 6 nodes x 8: 3 | 48
    plan_cli.validate_plan_args(args)
    with pytest.raises(DistributedConfigError, match="--esp 3 must divide the GPUs per node"):
        plan_cli.setup(args)


# ---- files --------------------------------------------------------------------------------
def _perf_dict():
    from moeflow.perf import perf_preset

    return perf_preset("fsmoe-testbed-a").to_dict()


BAD_JSON = {
    "missing": None,
    "not json": b"{not json",
    "binary": b"\xff\xfe\x00garbage",
    "a list": b"[1, 2, 3]",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "wrong format": json.dumps({"format": "other"}).encode(),
    "empty": b"",
}


@pytest.mark.parametrize("kind", sorted(BAD_JSON))
@pytest.mark.parametrize("flag", ["--perf", "--plan"])
def test_bad_perf_and_plan_files(tmp_path, kind, flag):
    path = tmp_path / "f.json"
    if BAD_JSON[kind] is not None:
        path.write_bytes(BAD_JSON[kind])
    loader = plan_io.load_perf_file if flag == "--perf" else plan_io.load_plan_file
    with pytest.raises(InputError) as ei:
        loader(path, flag)
    _one_line(ei.value, flag)
    assert str(path) in str(ei.value)


@pytest.mark.parametrize(
    "mutate, what",
    [
        (lambda d: d.pop("costs"), "costs"),
        (lambda d: d["costs"].pop("a2a"), "a2a"),
        (lambda d: d["costs"]["gemm"].update(alpha="x"), "could not convert"),
        (lambda d: d["costs"]["gemm"].update(alpha=float("nan")), "finite"),
        (lambda d: d.update(costs=[1]), "perf"),
        (lambda d: d.update(bytes_per_element=0), "bytes_per_element"),
    ],
)
def test_malformed_perf_fields(tmp_path, mutate, what):
    d = _perf_dict()
    mutate(d)
    path = tmp_path / "perf.json"
    path.write_text(json.dumps(d))
    with pytest.raises(InputError, match=what) as ei:
        plan_io.load_perf_file(path)
    _one_line(ei.value, "--perf")


@pytest.mark.parametrize(
    "layers, what",
    [
        ([], "0 layers"),
        ([{"index": 0, "r_fwd": 0, "r_bwd": 1}], "r_fwd"),
        ([{"index": 0, "r_fwd": 1, "r_bwd": 10**6}], "r_bwd"),
        ([{"index": 0, "r_fwd": 1}], "r_bwd"),
        ([{"index": 0, "r_fwd": 1, "r_bwd": 1, "gar_bytes": -1.0}], "gar_bytes"),
        ("x", "plan"),
    ],
)
def test_malformed_plan_fields(tmp_path, layers, what):
    d = {
        "format": "moeflow.plan/1",
        "method": "m",
        "perf": {},
        "workload_table": [],
        "layers": layers,
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(d))
    with pytest.raises(InputError, match=what) as ei:
        plan_io.load_plan_file(path)
    _one_line(ei.value, "--plan")


def test_plan_with_bad_perf_file_raises_input_error(tmp_path):
    path = tmp_path / "perf.json"
    path.write_text("{")
    args = _parse(plan_cli.add_plan_arguments, ["--perf", str(path), "--layers", "1"])
    with pytest.raises(InputError, match="--perf"):
        plan_cli.run_plan(args)


def test_train_plan_file_checked_in_the_parent(tmp_path):
    from moeflow.apps.train import add_train_arguments, validate_train_args

    args = _parse(add_train_arguments, ["--plan", str(tmp_path / "missing.json")])
    with pytest.raises(InputError, match="no such file"):
        validate_train_args(args)


def test_simulate_checks_output_dirs_before_simulating(tmp_path, monkeypatch):
    import moeflow.sim.builders as builders

    def must_not_run(plan):
        raise AssertionError("simulated before checking the output paths")

    monkeypatch.setattr(builders, "simulate_plan", must_not_run)
    for flag in ("--trace", "--png"):
        args = _parse(
            sim_cli.add_simulate_arguments,
            ["--layers", "1", flag, str(tmp_path / "nonexistent" / "t.out")],
        )
        with pytest.raises(InputError, match=f"{flag} .*does not exist"):
            sim_cli.run_simulate(args)
    args = _parse(sim_cli.add_simulate_arguments, ["--layers", "1", "--trace", str(tmp_path)])
    with pytest.raises(InputError, match="is a directory"):
        sim_cli.run_simulate(args)
    args = _parse(plan_cli.add_plan_arguments, ["--out", str(tmp_path / "no" / "p.json")])
    with pytest.raises(InputError, match="--out"):
        plan_cli.run_plan(args)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--dim", "10000000"], "--dim"),
        (["--seq-len", "100000000"], "--seq-len"),
        (["--dim", "8192", "--layers", "128"], "--dim/--layers/--experts/--ffn"),
        (["--batch-size", "4096", "--seq-len", "65536"], "--batch-size/--seq-len"),
    ],
)
def test_train_sizes_refused_before_building(argv, flag, monkeypatch):
    import moeflow.apps.train as train

    monkeypatch.setattr(train, "build_model", lambda *a, **k: pytest.fail("built the model"))
    with pytest.raises(ConfigError) as ei:
        train.main(argv)
    _one_line(ei.value, flag)


@pytest.mark.parametrize(
    "argv", [["--export", "out"], ["--checkpoint-dir", "c"], ["--data", "d.txt"], ["--resume"]]
)
def test_train_model_only_flags_without_model_are_refused(argv):
    from moeflow.apps.train import add_train_arguments, validate_train_args

    with pytest.raises(ConfigError, match=f"{argv[0]}.*only with --model") as ei:
        validate_train_args(_parse(add_train_arguments, argv))
    _one_line(ei.value, argv[0])


def test_train_steps_0_is_a_config_error():
    from moeflow.apps.train import main

    with pytest.raises(ConfigError, match="--steps"):
        main(["--steps", "0"])


# ---- through the `moeflow` error boundary --------------------------------------------------
@pytest.mark.parametrize(
    "argv",
    [
        ["plan", "--r-max", "0"],
        ["plan", "--tutel-r", "0"],
        ["plan", "--tutel-r", "1000000"],
        ["plan", "--lina-chunk-mb", "nan"],
        ["plan", "--nodes", "0"],
        ["plan", "--perf", "/nonexistent/perf.json"],
        ["simulate", "--trace", "/nonexistent/t.json"],
    ],
)
def test_cli_bad_input_exit_2_one_line(argv):
    r = subprocess.run(
        [sys.executable, "-m", "moeflow.cli", *argv], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2, (argv, r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moeflow: "), r.stderr
    assert "makespan" not in r.stdout  # nothing ran


def test_errors_are_moeflow_errors():
    # the boundary maps ValueError-based moeflow errors to exit 2
    for cls in (ConfigError, InputError, DistributedConfigError):
        assert issubclass(cls, MoeflowError) and issubclass(cls, ValueError)


# ---- crafted checkpoint directories: --model / --path of train, serve-bench, bench --------
def _tiny_model_dir(root):
    import torch
    import transformers

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        num_experts_per_tok=2,
        intermediate_size=32,
        moe_intermediate_size=12,
        num_experts=4,
        norm_topk_prob=True,
        mlp_only_layers=[],
        decoder_sparse_step=1,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(
        str(root), max_shard_size="20KB"
    )
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    return _tiny_model_dir(tmp_path_factory.mktemp("fuzz_model") / "hf")


def _first_shard(d):
    index = json.loads((d / "model.safetensors.index.json").read_text())
    return d / sorted(set(index["weight_map"].values()))[0]


def _craft(d, how):
    """Damage checkpoint directory ``d``; returns (error class name, text the error names)."""
    import struct

    shard = _first_shard(d)
    raw = shard.read_bytes()
    cfg = json.loads((d / "config.json").read_text())
    if how == "truncated weights":
        shard.write_bytes(raw[: len(raw) // 2])
    elif how == "garbage weights":
        shard.write_bytes(b"PK\x03\x04 not safetensors" * 8)
    elif how == "header claims 1e15 bytes":
        shard.write_bytes(struct.pack("<Q", 10**15) + raw[8:])
    elif how == "missing shard":
        shard.unlink()
        return "InputError", shard.name
    elif how == "truncated config":
        (d / "config.json").write_text(json.dumps(cfg)[:50])
        return "CorruptDataError", "config.json"
    elif how == "config not an object":
        (d / "config.json").write_text('["qwen3_moe"]')
        return "CorruptDataError", "config.json"
    elif how == "config shapes disagree":
        (d / "config.json").write_text(json.dumps({**cfg, "hidden_size": 24, "head_dim": 12}))
        return "CorruptDataError", "weight is"
    return "CorruptDataError", shard.name


CRAFTED = [
    "truncated weights",
    "garbage weights",
    "header claims 1e15 bytes",
    "missing shard",
    "truncated config",
    "config not an object",
    "config shapes disagree",
]
MODEL_COMMANDS = {
    "train": ["train", "--model", "{d}", "--steps", "1", "--batch-size", "2", "--seq-len", "8"],
    "train --nproc 2": ["train", "--model", "{d}", "--nproc", "2", "--steps", "1"],
    "serve-bench": ["serve-bench", "--model", "{d}", "--requests", "2"],
    "bench --model hf": ["bench", "train", "--model", "hf", "--path", "{d}", "--steps", "1"],
    "bench --model decoder": ["bench", "decode", "--model", "decoder", "--path", "{d}"],
}


@pytest.mark.parametrize("how", CRAFTED)
@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_crafted_checkpoint_dir_is_exit_2_one_line(model_dir, tmp_path, capfd, command, how):
    """Each command checks the directory in the parent, before any rank starts or any
    weight is read: exit 2 and one ``moeflow: ErrorName: ...`` line naming the file."""
    import shutil

    from moeflow.cli import main

    d = tmp_path / "hf"
    shutil.copytree(model_dir, d)
    kind, needle = _craft(d, how)
    code = main([a.format(d=d) for a in MODEL_COMMANDS[command]])
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(err) == 1 and err[0].startswith(f"moeflow: {kind}: "), err
    assert needle in err[0], err


@FUZZ
@given(
    cut=st.integers(0, 4000),
    flips=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
)
def test_fuzzed_safetensors_bytes_are_typed_errors(model_dir, tmp_path_factory, cut, flips):
    """Any truncation and any bytes written over a shard's header: the checks either accept
    the file (then it reads) or raise a typed moeflow error naming it."""
    import shutil

    from moeflow.checkpoint.pretrained import check_pretrained
    from moeflow.checkpoint.shards import SafetensorsCheckpoint

    d = tmp_path_factory.mktemp("fuzz") / "hf"
    shutil.copytree(model_dir, d)
    shard = _first_shard(d)
    raw = bytearray(shard.read_bytes())
    for pos, byte in flips:
        if pos < len(raw):
            raw[pos] = byte
    shard.write_bytes(bytes(raw[: len(raw) - cut]) if cut else bytes(raw))
    try:
        check_pretrained(d)
        with SafetensorsCheckpoint(str(d)) as ck:
            for k in ck.keys():
                ck.read(k)
    except MoeflowError as e:
        assert "\n" not in str(e)
        assert shard.name in str(e) or "config.json" in str(e), e


# ---- serve-bench ----------------------------------------------------------------------------
def _serve_args(*argv):
    from moeflow.apps import serve_bench

    return _parse(serve_bench.add_serve_bench_arguments, list(argv))


def _no_model(monkeypatch):
    """Make building the serve-bench model fail loudly: validation must come first."""
    from moeflow.apps import serve_bench

    def must_not_run(args):
        raise AssertionError("the model was built before every flag was checked")

    monkeypatch.setattr(serve_bench, "_model", must_not_run)


def _hf_dir(tmp_path):
    d = tmp_path / "qwen"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "qwen3_moe"}')
    (d / "model.safetensors").write_bytes(b"weights")
    return d


SERVE_INT_FLAGS = {
    "--requests": lambda v: 1 <= v <= 10_000,
    "--demo-layers": lambda v: 1 <= v <= 64,
    "--demo-hidden": lambda v: 1 <= v <= 8192,
    "--demo-experts": lambda v: 1 <= v <= 256,
    "--repeat": lambda v: 1 <= v <= 100,
    "--pppipe-r1": lambda v: 1 <= v <= 64,
    "--r1": lambda v: 1 <= v <= 64,
    "--r2": lambda v: 1 <= v <= 64,
}


@FUZZ
@given(flag=st.sampled_from(sorted(SERVE_INT_FLAGS)), v=INTS)
def test_serve_bench_sizes_are_bounded(flag, v):
    from moeflow.apps.serve_bench import MAX_DEMO_PARAMS, demo_params, validate_serve_bench_args

    args = _serve_args(f"{flag}={v}")
    valid = SERVE_INT_FLAGS[flag](v)
    if valid and flag.startswith("--demo-"):
        valid = demo_params(args.demo_layers, args.demo_hidden, args.demo_experts) <= (
            MAX_DEMO_PARAMS
        )
    try:
        validate_serve_bench_args(args)
    except ConfigError as e:
        assert not valid, f"{flag} {v} refused: {e}"
        _one_line(e, flag)
        return
    assert valid, f"{flag} {v} accepted"


def test_serve_bench_demo_model_size_is_checked_before_building(monkeypatch):
    from moeflow.apps.serve_bench import run_serve_bench

    _no_model(monkeypatch)
    argv = ["--demo-layers", "64", "--demo-hidden", "8192", "--demo-experts", "256"]
    with pytest.raises(ConfigError, match="--demo-hidden.*parameters"):
        run_serve_bench(_serve_args(*argv))


@FUZZ
@given(v=FLOATS)
def test_serve_bench_timeout_checked_first(v):
    from moeflow.apps.serve_bench import validate_serve_bench_args

    args = _serve_args(f"--timeout={v!r}")
    if math.isfinite(v) and v > 0:
        validate_serve_bench_args(args)
    else:
        with pytest.raises(ConfigError) as ei:
            validate_serve_bench_args(args)
        _one_line(ei.value, "--timeout")


def test_serve_bench_nproc_cap_and_force_nproc(monkeypatch):
    from moeflow import launch
    from moeflow.apps.serve_bench import validate_serve_bench_args

    monkeypatch.setattr(launch, "max_ranks", lambda: 2)
    monkeypatch.setattr(launch, "_cpus", lambda: 1)
    args = _serve_args("--ag", "2", "--eg", "1")
    with pytest.raises(ConfigError, match="--ag \\+ --eg.*--force-nproc"):
        validate_serve_bench_args(args)
    validate_serve_bench_args(_serve_args("--ag", "2", "--eg", "1", "--force-nproc"))


def test_serve_bench_json_never_overwrites_an_input(tmp_path, monkeypatch):
    from moeflow.apps.serve_bench import run_serve_bench

    _no_model(monkeypatch)
    model = _hf_dir(tmp_path)
    cfg = model / "config.json"
    before = cfg.read_bytes()
    (tmp_path / "link.json").symlink_to(cfg)
    monkeypatch.chdir(tmp_path)
    for out in (str(cfg), "./qwen/config.json", "qwen//config.json", "link.json"):
        for force in ([], ["--force"]):
            args = _serve_args("--model", "./qwen/", "--json", out, *force)
            with pytest.raises(InputError, match="--json .*input") as ei:
                run_serve_bench(args)
            _one_line(ei.value, "--json")
    assert cfg.read_bytes() == before


def test_serve_bench_existing_json_needs_force(tmp_path, monkeypatch):
    from moeflow.apps.serve_bench import run_serve_bench

    _no_model(monkeypatch)
    out = tmp_path / "rec.json"
    out.write_text("keep")
    with pytest.raises(InputError, match="--json .*exists; pass --force"):
        run_serve_bench(_serve_args("--json", str(out)))
    with pytest.raises(AssertionError, match="model was built"):  # passed validation
        run_serve_bench(_serve_args("--json", str(out), "--force"))
    assert out.read_text() == "keep"


# ---- geo plan | train -----------------------------------------------------------------------
def _geo_args(*argv):
    from moeflow.cli import geo as geo_cli

    return _parse(geo_cli.add_geo_arguments, list(argv))


def _devices_file(tmp_path):
    doc = {
        "devices": [
            {"name": "a0", "tflops": 10, "memory_gb": 16, "site": "a"},
            {"name": "b0", "tflops": 10, "memory_gb": 16, "site": "b"},
        ],
        "sites": {
            "a": {"bandwidth_mbps": 1000, "latency_ms": 0.1},
            "b": {"bandwidth_mbps": 1000, "latency_ms": 0.1},
        },
        "site_links": [{"a": "a", "b": "b", "bandwidth_mbps": 10, "latency_ms": 20}],
    }
    path = tmp_path / "sites.json"
    path.write_text(json.dumps(doc))
    return path


GEO_INT_FLAGS = {
    "--dim": ("dim", 8192),
    "--layers": ("layers", 128),
    "--heads": ("heads", 128),
    "--seq-len": ("seq_len", 8192),
    "--experts": ("experts", 256),
    "--microbatch-size": ("microbatch_size", 1024),
    "--microbatches": ("microbatches", 1024),
}


@FUZZ
@given(flag=st.sampled_from(sorted(GEO_INT_FLAGS)), v=INTS, sub=st.sampled_from(["plan", "train"]))
def test_geo_sizes_are_bounded(flag, v, sub):
    from moeflow.cli.geo import validate_model_args

    extra = ["--devices", "d.json"] if sub == "plan" else []
    args = _geo_args(sub, f"{flag}={v}", *extra)
    attr, cap = GEO_INT_FLAGS[flag]
    try:
        validate_model_args(args)
    except ConfigError as e:
        assert not 1 <= v <= cap, f"{flag} {v} refused: {e}"
        _one_line(e, flag)
        return
    assert 1 <= v <= cap and getattr(args, attr) == v


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--layers", "100000"], "--layers"),
        (["--dim", "10000000"], "--dim"),
        (["--seq-len", "100000000"], "--seq-len"),
        (["--dim", "8192", "--layers", "128"], "--dim/--layers/--experts"),
        (["--seq-len", "8192", "--microbatch-size", "1024"], "--microbatch-size/--seq-len"),
    ],
)
def test_geo_train_sizes_refused_before_building(argv, flag, monkeypatch):
    from moeflow.cli import geo as geo_cli
    from moeflow.geo import pipeline as geo

    monkeypatch.setattr(geo, "build_module", lambda job: pytest.fail("built the model"))
    with pytest.raises(ConfigError) as ei:
        geo_cli.job_from_args(_geo_args("train", *argv))
    _one_line(ei.value, flag)


def test_geo_plan_sizes_refused_before_tracing(tmp_path, monkeypatch):
    from moeflow.cli import geo as geo_cli
    from moeflow.geo import pipeline as geo

    monkeypatch.setattr(geo, "build_module", lambda job: pytest.fail("built the model"))
    args = _geo_args("plan", "--devices", str(_devices_file(tmp_path)), "--layers", "100000")
    with pytest.raises(ConfigError, match="--layers"):
        geo_cli.run_geo(args)


@pytest.mark.parametrize("v", ["0", "1", "-3"])
def test_geo_train_stages_below_2_refused(v):
    from moeflow.cli import geo as geo_cli

    with pytest.raises(ConfigError) as ei:
        geo_cli.job_from_args(_geo_args("train", "--stages", v))
    _one_line(ei.value, "--stages")


@FUZZ
@given(v=FLOATS)
def test_geo_train_timeout(v):
    from moeflow.cli import geo as geo_cli

    args = _geo_args("train", f"--timeout={v!r}")
    if math.isfinite(v) and v > 0:
        assert geo_cli.job_from_args(args).timeout_s == v
    else:
        with pytest.raises(ConfigError) as ei:
            geo_cli.job_from_args(args)
        _one_line(ei.value, "--timeout")


def test_geo_train_bad_plan_bounds_refused_before_forking(tmp_path, monkeypatch):
    import moeflow.launch as launch
    from moeflow.cli import geo as geo_cli

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("forked"))
    plan = tmp_path / "plan.json"
    small = {"dim": 16, "layers": 1, "heads": 2, "seq_len": 8}
    for bounds in ([0, 3, 10**6], [0, 10**6]):
        d = {"plan": {"bounds": bounds, "densities": [1.0] * (len(bounds) - 2)}, "job": small}
        plan.write_text(json.dumps(d))
        with pytest.raises(ConfigError, match="--plan .*bounds"):
            geo_cli.run_geo(_geo_args("train", "--plan", str(plan), "--steps", "1"))
    plan.write_text(json.dumps({"plan": {"bounds": [0, 5], "densities": []}, "job": {"x": 1}}))
    with pytest.raises(ConfigError, match="--plan"):
        geo_cli.run_geo(_geo_args("train", "--plan", str(plan)))


def test_geo_train_checkpoint_dir_file_refused_first(tmp_path, monkeypatch):
    from moeflow.cli import geo as geo_cli
    from moeflow.geo import pipeline as geo

    monkeypatch.setattr(geo, "build_module", lambda job: pytest.fail("built the model"))
    f = tmp_path / "ckpt"
    f.write_text("x")
    with pytest.raises(InputError, match="--checkpoint-dir .*is a file"):
        geo_cli.run_geo(_geo_args("train", "--checkpoint-dir", str(f), "--checkpoint-every", "1"))


def test_geo_outputs_never_overwrite_inputs(tmp_path, monkeypatch):
    from moeflow.cli import geo as geo_cli
    from moeflow.geo import pipeline as geo

    monkeypatch.setattr(geo, "build_module", lambda job: pytest.fail("built the model"))
    devices = _devices_file(tmp_path)
    before = devices.read_bytes()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "link.json").symlink_to(devices)
    for out in (str(devices), "./sites.json", "link.json"):
        with pytest.raises(InputError, match="--out .*is the input"):
            geo_cli.run_geo(_geo_args("plan", "--devices", "sites.json", "--out", out, "--force"))
    assert devices.read_bytes() == before
    other = tmp_path / "old.json"
    other.write_text("keep")
    with pytest.raises(InputError, match="--out .*--force"):
        geo_cli.run_geo(_geo_args("plan", "--devices", "sites.json", "--out", str(other)))
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"plan": {"bounds": [0, 5, 9], "densities": [1.0]}}))
    for out in (str(plan), "./plan.json"):
        with pytest.raises(InputError, match="--json .*is the input"):
            geo_cli.run_geo(_geo_args("train", "--plan", "plan.json", "--json", out, "--force"))
    with pytest.raises(InputError, match="--json .*--force"):
        geo_cli.run_geo(_geo_args("train", "--json", str(other)))
    assert other.read_text() == "keep"


def test_geo_plan_devices_not_utf8(tmp_path):
    from moeflow.cli import geo as geo_cli

    bad = tmp_path / "sites.json"
    bad.write_bytes(b'{"devices": "\xff\xfe"}')
    with pytest.raises(InputError, match="UTF-8") as ei:
        geo_cli.run_geo(_geo_args("plan", "--devices", str(bad)))
    _one_line(ei.value, str(bad))


def test_geo_plan_writes_atomically_with_force(tmp_path):
    from moeflow.cli import geo as geo_cli

    out = tmp_path / "plan.json"
    out.write_text("old")
    argv = ["--dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "8"]
    args = _geo_args("plan", "--devices", str(_devices_file(tmp_path)), "--out", str(out), *argv)
    args.force = True
    assert geo_cli.run_geo(args) == 0
    assert json.loads(out.read_text())["plan"]["bounds"][0] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "sites.json"]


# ---- train --model DIR: --export, --checkpoint-dir, --data -----------------------------------
@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.parallel.test_parallelize import save_tiny

    return save_tiny("qwen3_moe", tmp_path_factory.mktemp("hf") / "qwen")


def _snapshot(d) -> dict:
    from pathlib import Path

    return {p.name: p.read_bytes() for p in sorted(Path(d).iterdir())}


def _train_refuses(monkeypatch, argv, err, match):
    import moeflow.apps.train as train
    import moeflow.launch as launch

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("forked"))
    monkeypatch.setattr(train, "hf_train_loop", lambda *a, **k: pytest.fail("trained"))
    with pytest.raises(err, match=match) as ei:
        train.main(argv)
    assert "\n" not in str(ei.value)


@pytest.mark.parametrize("nproc", [[], ["--nproc", "2", "--batch-size", "2"]])
def test_train_export_never_replaces_the_input_model(tiny_qwen, tmp_path, monkeypatch, nproc):
    import os

    before = _snapshot(tiny_qwen)
    parent, name = os.path.split(tiny_qwen)
    (tmp_path / "link").symlink_to(tiny_qwen)
    monkeypatch.chdir(parent)
    for export in (name, f"./{name}/", str(tmp_path / "link"), f"{name}/sub", parent):
        argv = ["--model", name, "--export", export, "--force", "--steps", "1", *nproc]
        _train_refuses(monkeypatch, argv, InputError, "--export .*input")
    assert _snapshot(tiny_qwen) == before


def test_train_export_existing_dir_or_file(tiny_qwen, tmp_path, monkeypatch):
    old = tmp_path / "out"
    old.mkdir()
    (old / "keep.txt").write_text("x")
    argv = ["--model", tiny_qwen, "--steps", "1", "--export"]
    _train_refuses(monkeypatch, [*argv, str(old)], InputError, "--export .*--force")
    f = tmp_path / "some_file"
    f.write_text("x")
    _train_refuses(monkeypatch, [*argv, str(f), "--force"], InputError, "not a directory")
    _train_refuses(monkeypatch, [*argv, str(tmp_path / "no" / "dir")], InputError, "does not exist")


def test_train_checkpoint_dir_file_and_empty_data_refused_first(tiny_qwen, tmp_path, monkeypatch):
    f = tmp_path / "ckpt"
    f.write_text("x")
    argv = ["--model", tiny_qwen, "--steps", "1"]
    _train_refuses(monkeypatch, [*argv, "--checkpoint-dir", str(f)], InputError, "--checkpoint-dir")
    _train_refuses(
        monkeypatch, [*argv, "--checkpoint-dir", tiny_qwen], InputError, "--checkpoint-dir"
    )
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    _train_refuses(monkeypatch, [*argv, "--data", str(empty)], ConfigError, "--data")


def test_train_export_force_replaces_the_directory_whole(tiny_qwen, tmp_path):
    from moeflow.apps.train import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_text("old weights")
    argv = ["--model", tiny_qwen, "--steps", "1", "--batch-size", "1", "--seq-len", "8"]
    argv += ["--corpus-bytes", "2000", "--export", str(out), "--force"]
    assert main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert "config.json" in names and "stale.safetensors" not in names  # not mixed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


def test_export_pretrained_checks_before_gathering(tiny_qwen, tmp_path, monkeypatch):
    import importlib

    import transformers

    from moeflow.parallel import export_pretrained

    par = importlib.import_module("moeflow.parallel.parallelize")

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_qwen)
    monkeypatch.setattr(par, "gather_hf_state_dict", lambda m: pytest.fail("gathered"))
    with pytest.raises(InputError, match="is the input"):
        export_pretrained(model, tiny_qwen, overwrite=True)
    existing = tmp_path / "e"
    existing.mkdir()
    with pytest.raises(InputError, match="--force"):
        export_pretrained(model, str(existing))
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(InputError, match="not a directory"):
        export_pretrained(model, str(f), overwrite=True)


# ---- bench train | decode -------------------------------------------------------------------
def _bench_args(*argv):
    from moeflow.cli.bench import add_bench_arguments

    return _parse(add_bench_arguments, list(argv))


@pytest.mark.parametrize("mode", ["train", "decode"])
@pytest.mark.parametrize("flag", ["--json", "--png", "--profile-out"])
def test_bench_outputs_never_overwrite_inputs(tiny_qwen, tmp_path, monkeypatch, mode, flag):
    import os

    from moeflow.cli.bench import build_job

    cfg = os.path.join(tiny_qwen, "config.json")
    before = open(cfg, "rb").read()
    perf = tmp_path / "perf.json"
    perf.write_text(json.dumps(_perf_dict()))
    monkeypatch.chdir(os.path.dirname(tiny_qwen))
    for out in (cfg, "./qwen/config.json"):
        args = _bench_args(mode, "--model", "decoder", "--path", "qwen", flag, out, "--force")
        with pytest.raises(InputError, match=f"{flag} .*input") as ei:
            build_job(args)
        _one_line(ei.value, flag)
    args = _bench_args(mode, "--perf", str(perf), flag, str(perf), "--force")
    with pytest.raises(InputError, match="is the input"):
        build_job(args)
    old = tmp_path / "old.out"
    old.write_text("keep")
    with pytest.raises(InputError, match=f"{flag} .*--force"):
        build_job(_bench_args(mode, flag, str(old)))
    build_job(_bench_args(mode, flag, str(old), "--force"))
    assert open(cfg, "rb").read() == before and old.read_text() == "keep"


def test_bench_trace_dir_that_is_a_file(tmp_path):
    from moeflow.cli.bench import build_job

    f = tmp_path / "t"
    f.write_text("x")
    with pytest.raises(InputError, match="--trace-dir .*not a directory") as ei:
        build_job(_bench_args("train", "--trace-dir", str(f), "--force"))
    _one_line(ei.value, "--trace-dir")
    with pytest.raises(InputError, match="--trace-dir .*--force"):
        build_job(_bench_args("train", "--trace-dir", str(tmp_path)))
    assert build_job(_bench_args("train", "--trace-dir", str(tmp_path), "--force")).trace_dir


def test_bench_trace_dir_file_exit_2_one_line(tmp_path):
    f = tmp_path / "t"
    f.write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "moeflow.cli", "bench", "train", "--trace-dir", str(f)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--trace-dir" in r.stderr


def test_bench_hf_dense_model_refused_before_any_step(tmp_path):
    from moeflow.cli.bench import build_job

    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    with pytest.raises(ConfigError, match="--path.*mixture-of-experts") as ei:
        build_job(_bench_args("train", "--model", "hf", "--path", str(d)))
    _one_line(ei.value, "--path")
    nested = {"model_type": "qwen3_vl_moe", "text_config": {"num_experts": 4}}
    (d / "config.json").write_text(json.dumps(nested))
    # experts named inside pass the MoE check; the checkpoint check that follows then names
    # what else is missing (this directory holds a config only)
    with pytest.raises(MoeflowError) as ei:
        build_job(_bench_args("train", "--model", "hf", "--path", str(d)))
    assert "mixture-of-experts" not in str(ei.value)


def test_bench_hf_model_without_moe_layers_refused_at_build(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    from moeflow.apps.bench import workloads

    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match="--path.*no MoE layer"):
        workloads._hf_model(str(tmp_path / "gpt2"))


# ---- plan --out, simulate --trace/--png, profile --out --------------------------------------
def test_plan_and_simulate_outputs_never_overwrite_inputs(tmp_path, monkeypatch):
    perf = tmp_path / "perf.json"
    perf.write_text(json.dumps(_perf_dict()))
    before = perf.read_bytes()
    (tmp_path / "link.json").symlink_to(perf)
    monkeypatch.chdir(tmp_path)
    for out in (str(perf), "./perf.json", "link.json"):
        args = _parse(plan_cli.add_plan_arguments, ["--perf", "perf.json", "--out", out])
        args.force = True
        with pytest.raises(InputError, match="--out .*is the input"):
            plan_cli.validate_plan_args(args)
        for flag in ("--trace", "--png"):
            args = _parse(sim_cli.add_simulate_arguments, ["--perf", "perf.json", flag, out])
            args.force = True
            with pytest.raises(InputError, match=f"{flag} .*is the input"):
                sim_cli.validate_simulate_args(args)
    assert perf.read_bytes() == before


def test_plan_simulate_profile_existing_output_needs_force(tmp_path):
    from moeflow.apps import profile as profiler

    old = tmp_path / "old.json"
    old.write_text("keep")
    cases = [
        (plan_cli.add_plan_arguments, plan_cli.validate_plan_args, "--out"),
        (sim_cli.add_simulate_arguments, sim_cli.validate_simulate_args, "--trace"),
        (sim_cli.add_simulate_arguments, sim_cli.validate_simulate_args, "--png"),
        (profiler.add_profile_arguments, profiler.validate_profile_args, "--out"),
    ]
    for adder, validate, flag in cases:
        with pytest.raises(InputError, match=f"{flag} .*exists; pass --force"):
            validate(_parse(adder, [flag, str(old)]))
        validate(_parse(adder, [flag, str(old), "--force"]))
    assert old.read_text() == "keep"


def test_plan_out_force_replaces_atomically(tmp_path):
    out = tmp_path / "p.json"
    out.write_text("old")
    args = _parse(plan_cli.add_plan_arguments, ["--layers", "2", "--out", str(out), "--force"])
    assert plan_cli.run_plan(args) == 0
    assert json.loads(out.read_text())["layers"]
    assert [p.name for p in tmp_path.iterdir()] == ["p.json"]


@pytest.mark.parametrize("timeout", [0, -5.0, math.nan, math.inf])
def test_serve_api_checks_timeout_before_forking(timeout, monkeypatch):
    import moeflow.launch as launch
    from moeflow.serving.disaggregated import serve

    monkeypatch.setattr(launch, "launch", lambda *a, **k: pytest.fail("forked"))
    with pytest.raises(ConfigError, match="timeout_s"):
        serve(object(), [], timeout_s=timeout)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_outputs_keep_the_old_one_on_error(tmp_path, exc):
    from moeflow.files import atomic_dir, atomic_file

    f = tmp_path / "out.json"
    f.write_text("old")
    d = tmp_path / "export"
    d.mkdir()
    (d / "config.json").write_text("old")
    with pytest.raises(exc):
        with atomic_file(f, force=True) as fh:
            fh.write("half")
            raise exc()
    with pytest.raises(exc):
        with atomic_dir(d, force=True) as tmp:
            (Path(tmp) / "model.safetensors").write_text("half")
            raise exc()
    assert f.read_text() == "old" and [p.name for p in d.iterdir()] == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "out.json"]
    with atomic_dir(d, force=True) as tmp:
        (Path(tmp) / "new.bin").write_text("new")
    assert [p.name for p in d.iterdir()] == ["new.bin"]
    with pytest.raises(InputError, match="appeared while writing"):
        with atomic_file(tmp_path / "late.json", force=False) as fh:
            (tmp_path / "late.json").write_text("someone else's")
    assert (tmp_path / "late.json").read_text() == "someone else's"
