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
    "--batch-size": lambda v: v >= 1,
    "--seq-len": lambda v: 1 <= v <= 1_000_000 - 2,  # the corpus must hold a sequence
    "--dim": lambda v: v >= 1 and v % 4 == 0,  # 4 attention heads
    "--layers": lambda v: v >= 1,
    "--experts": lambda v: v >= 2,  # top-k 2
    "--top-k": lambda v: 1 <= v <= 8,  # 8 experts
    "--ffn": lambda v: v >= 1,
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
