"""EP training follows the single-process run of the same model, seed and global batch."""

from __future__ import annotations

import argparse

import pytest
import torch

from moeflow.errors import ConfigError, DistributedConfigError
from tests._dist import run_ranks

pytestmark = pytest.mark.dist


def _args(**kw) -> argparse.Namespace:
    from moeflow.apps.train import add_train_arguments

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    a = p.parse_args([])
    # aux loss off: its statistics are per rank in EP and per global batch in one process
    base = dict(
        steps=20,
        batch_size=8,
        seq_len=32,
        dim=32,
        layers=2,
        experts=8,
        ffn=64,
        aux_loss_coef=0.0,
        max_seconds=1e9,
        timeout=60.0,
        lr=3e-3,
    )
    base.update(kw)
    for k, v in base.items():
        setattr(a, k, v)
    return a


def _ep_run(rank, world, args_list, corpus):
    from moeflow.apps.train import train_loop
    from moeflow.comm import Topology

    outs = []
    for a in args_list:
        a._corpus = corpus
        outs.append(train_loop(a, topology=Topology.explicit(world, 2), verbose=False)["losses"])
    return outs


def test_ep_training_matches_single_process_20_steps():
    from moeflow.apps.train import train_loop
    from moeflow.models.demo import load_corpus

    corpus = load_corpus(max_bytes=100_000)
    single = _args()
    single._corpus = corpus
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks use one thread each; 2 threads on a busy box crawl
    try:
        ref = train_loop(single, verbose=False)["losses"]
    finally:
        torch.set_num_threads(threads)
    variants = [
        _args(dispatcher="a2a", r_fwd=2, r_bwd=4),
        _args(dispatcher="2dh", esp=2, r_fwd=4, r_bwd=1),
    ]
    res = run_ranks(_ep_run, 4, variants, corpus, timeout_s=240)
    assert len(ref) == 20 and ref[-1] < ref[0] - 0.5  # it actually trains
    for losses in res[0]:
        assert len(losses) == 20
        worst = max(abs(a - b) for a, b in zip(losses, ref))
        assert worst < 2e-3, (worst, losses, ref)
    assert res[1] == res[0]  # every rank reports the same global loss


def _single(corpus, **kw):
    from moeflow.apps.train import train_loop

    a = _args(**kw)
    a._corpus = corpus
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_loop(a, verbose=False)
    finally:
        torch.set_num_threads(threads)


def test_every_dispatcher_schedule_and_the_global_aux_loss_match_single_process():
    """4 ranks declared as 2 nodes x 2 (as ``--nodes 2``): dedup, hierarchical under Parm's
    split_rows and a2a under split_tokens (ESP = MP group of 2: 2 distinct batches), and the
    global-batch aux loss, all follow the single-process run of the same global batch."""
    from moeflow.models.demo import load_corpus

    corpus = load_corpus(max_bytes=100_000)
    ref = _single(corpus, steps=10)["losses"]
    ref_aux = _single(corpus, steps=10, aux_loss_coef=0.05)["losses"]
    variants = [
        _args(steps=10, dispatcher="dedup", nodes=2),
        _args(steps=10, dispatcher="hierarchical", esp=2, schedule="split_rows", nodes=2),
        _args(steps=10, dispatcher="a2a", esp=2, schedule="split_tokens", nodes=2, r_fwd=2),
        _args(steps=10, dispatcher="2dh", aux_loss="global", aux_loss_coef=0.05, nodes=2),
        _args(steps=10, dispatcher="2dh", aux_loss="local", aux_loss_coef=0.05, nodes=2),
    ]
    res = run_ranks(_ep_run, 4, variants, corpus, timeout_s=300)
    assert ref[-1] < ref[0] - 0.3
    for a, losses in zip(variants[:4], res[0]):
        want = ref_aux if a.aux_loss == "global" else ref
        worst = max(abs(x - y) for x, y in zip(losses, want))
        assert len(losses) == 10 and worst < 2e-3, (a.dispatcher, a.schedule, worst)
    # with the aux loss on: the global one is the single-process objective (float rounding
    # apart); the per-rank default trains another model
    glob, local = (max(abs(x - y) for x, y in zip(res[0][i], ref_aux)) for i in (3, 4))
    assert glob < 1e-5 and local > 1e-4, (glob, local)
    assert res[1] == res[0] == res[3]


def test_bfloat16_trains_with_fp32_masters_and_tracks_fp32():
    """``--dtype bfloat16``: the model runs in bf16, the masters and AdamW's state are fp32,
    the loss falls, and over 20 steps every global loss stays within 0.1 nats of the fp32
    run's (2% of the initial loss; bf16 keeps 8 mantissa bits), the last within 0.05."""
    from moeflow.models.demo import load_corpus

    corpus = load_corpus(max_bytes=100_000)
    fp32 = _single(corpus, aux_loss_coef=0.01)["losses"]
    out = _single(corpus, aux_loss_coef=0.01, dtype="bfloat16")
    bf16, masters, opt = out["losses"], out["masters"], out["optimizer"]
    assert all(p.dtype == torch.float32 for p in masters.parameters())
    assert all(p.dtype == torch.bfloat16 for p in masters.model_params)
    state = [t for s in opt.state.values() for t in s.values() if t.dim() > 0]
    assert state and all(t.dtype == torch.float32 for t in state)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {
        id(p) for p in masters.parameters()
    }
    # the bf16 model holds the masters rounded to bf16
    for m, p in zip(masters.parameters(), masters.model_params):
        assert torch.equal(p, m.detach().to(torch.bfloat16))
    assert len(bf16) == 20 and bf16[-1] < bf16[0] - 0.5
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.1, (bf16, fp32)
    assert abs(bf16[-1] - fp32[-1]) < 0.05
    assert bf16 != fp32  # it did run in bf16


def test_bfloat16_on_expert_parallel_ranks_tracks_fp32():
    from moeflow.models.demo import load_corpus

    corpus = load_corpus(max_bytes=100_000)
    fp32 = _single(corpus, steps=10)["losses"]
    res = run_ranks(_ep_run, 2, [_args(steps=10, dtype="bfloat16")], corpus, timeout_s=240)
    bf16 = res[0][0]
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) < 0.1 and bf16[-1] < bf16[0] - 0.3


@pytest.mark.parametrize(
    "flags, error, text",
    [
        (dict(dispatcher="dedup", esp=2), "ConfigError", "--dispatcher"),
        (dict(schedule="plain"), "ConfigError", "--schedule"),
        (dict(schedule="s1", esp=2, nproc=1), "ConfigError", "--schedule"),
        (dict(nodes=3), "DistributedConfigError", "--nodes 3"),
        (dict(nodes=2, ranks_per_node=1), "ConfigError", "--ranks-per-node"),
        (dict(schedule="s2", esp=2, aux_loss="global"), "ConfigError", "--aux-loss"),
        (dict(esp=4, nodes=2), "DistributedConfigError", "--esp 4"),
    ],
)
def test_impossible_layouts_fail_before_forking(flags, error, text):
    from moeflow.apps.train import validate_train_args
    from moeflow.errors import MoeflowError

    a = _args(nproc=4, force_nproc=True)
    for k, v in flags.items():
        setattr(a, k, v)
    with pytest.raises(MoeflowError) as e:
        validate_train_args(a)
    assert type(e.value).__name__ == error and text in str(e.value), str(e.value)


def test_schedule_aliases_and_nodes_set_the_layout():
    from moeflow.apps.train import _topology, validate_train_args

    a = _args(nproc=4, force_nproc=True, esp=2, schedule="s1", nodes=2)
    validate_train_args(a)
    assert a.schedule == "split_tokens" and a.ranks_per_node == 2
    assert _topology(a, 4).num_nodes == 2
    b = _args(nproc=4, force_nproc=True, nodes=4, dispatcher="dedup")
    validate_train_args(b)
    assert _topology(b, 4).num_nodes == 4


@pytest.mark.slow
def test_moeflow_train_cli_spawns_ranks(tmp_path):
    import subprocess
    import sys

    from moeflow.plan import LayerPlan, Plan

    plan = Plan(
        method="manual",
        perf={},
        workload_table=[],
        layers=[LayerPlan(index=0, r_fwd=4, r_bwd=2), LayerPlan(index=1, r_fwd=2, r_bwd=1)],
    )
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "moeflow.cli",
            "train",
            "--nproc",
            "4",
            "--steps",
            "3",
            "--log-every",
            "1",
            "--dispatcher",
            "2dh",
            "--plan",
            str(path),
            "--corpus-bytes",
            "100000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[(4, 2), (2, 1)]" in out.stdout
    assert "tokens/s" in out.stdout and "summary: 3 steps" in out.stdout


def _tiny_train_argv(nproc, timeout):
    return [
        "--nproc",
        str(nproc),
        "--steps",
        "2",
        "--batch-size",
        "4",
        "--seq-len",
        "16",
        "--dim",
        "16",
        "--layers",
        "1",
        "--experts",
        "4",
        "--ffn",
        "16",
        "--corpus-bytes",
        "20000",
        "--timeout",
        str(timeout),
    ]


@pytest.mark.parametrize("fault", ["sigstop", "raise"])
def test_train_launcher_ends_the_run_naming_the_rank(monkeypatch, fault):
    import os
    import signal
    import time

    import moeflow.apps.train as train
    from moeflow.errors import CommTimeoutError
    from moeflow.launch import RankFailed

    real = train.train_loop

    def faulty(args, group=None, topology=None, device=None, verbose=True):
        import torch.distributed as dist

        if dist.get_rank() == 1:
            if fault == "sigstop":
                os.kill(os.getpid(), signal.SIGSTOP)
            raise ValueError("rank-local failure")
        return real(args, group, topology, device, verbose)

    monkeypatch.setattr(train, "train_loop", faulty)  # the forked ranks inherit it
    t0 = time.monotonic()
    expected = CommTimeoutError if fault == "sigstop" else RankFailed
    with pytest.raises(expected) as ei:
        train.main(_tiny_train_argv(2, timeout=2))
    # used to wait forever (SIGSTOP) or print one traceback per rank
    assert time.monotonic() - t0 < 30
    assert "rank 1" in str(ei.value) and "\n" not in str(ei.value)
    import multiprocessing

    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not multiprocessing.active_children()


# -- moeflow train --model PATH: fine-tuning a transformers checkpoint directory ------------
def _hf_args(model_dir, **kw) -> argparse.Namespace:
    from moeflow.apps.train import add_train_arguments

    p = argparse.ArgumentParser()
    add_train_arguments(p)
    a = p.parse_args(["--model", str(model_dir)])
    base = dict(
        steps=6,
        batch_size=4,
        seq_len=8,
        lr=1e-2,
        max_seconds=1e9,
        timeout=60.0,
        corpus_bytes=20_000,
        r_fwd=1,
        r_bwd=1,
    )
    base.update(kw)
    for k, v in base.items():
        setattr(a, k, v)
    return a


def test_train_model_dir_checkpoints_and_resumes_on_the_same_curve(tmp_path, capfd):
    pytest.importorskip("transformers")
    from moeflow.apps.train import _hf_rank, main, validate_train_args
    from moeflow.launch import launch
    from tests.parallel.test_parallelize import save_tiny

    model_dir = save_tiny("qwen3_moe", tmp_path / "hf")
    text = tmp_path / "data.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 50)
    full = _hf_args(model_dir, data=str(text))
    validate_train_args(full, world=4)
    ref = launch(_hf_rank, 4, full, force=True, timeout_s=120, progress=False)[0]["losses"]
    assert len(ref) == 6
    ckpt = tmp_path / "ckpt"
    # the command line: 3 steps, checkpoint at step 3, exported transformers directory
    rc = main(
        [
            "--model",
            str(model_dir),
            "--nproc",
            "4",
            "--data",
            str(text),
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--seq-len",
            "8",
            "--lr",
            "1e-2",
            "--r-fwd",
            "1",
            "--r-bwd",
            "1",
            "--checkpoint-dir",
            str(ckpt),
            "--checkpoint-every",
            "3",
            "--export",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 0
    err = capfd.readouterr().err
    assert "3/3" in err  # the progress bar reached the end
    assert (ckpt / ".metadata").exists()
    assert (tmp_path / "out" / "config.json").exists()
    resumed = _hf_args(model_dir, data=str(text), checkpoint_dir=str(ckpt), resume=True)
    validate_train_args(resumed, world=4)
    out = launch(_hf_rank, 4, resumed, force=True, timeout_s=120, progress=False)[0]
    assert out["first_step"] == 4
    assert max(abs(a - b) for a, b in zip(out["losses"], ref[3:])) < 1e-6, (out, ref)


def test_train_model_dir_bad_layout_fails_before_forking(tmp_path):
    pytest.importorskip("transformers")
    from moeflow.apps.train import main
    from moeflow.errors import DistributedConfigError
    from tests.parallel.test_parallelize import save_tiny

    model_dir = save_tiny("qwen3_moe", tmp_path / "hf", experts=6)
    with pytest.raises(DistributedConfigError, match="6 experts"):
        main(["--model", str(model_dir), "--nproc", "4", "--steps", "1"])


def test_train_model_dir_on_declared_nodes_with_dedup_and_parm_follows_one_process(tmp_path):
    """--model on 4 ranks as --nodes 2: dedup, and hierarchical under Parm's split_rows
    (--esp 2: 2 distinct batches of 2 rows), follow the one-process fine-tuning run."""
    pytest.importorskip("transformers")
    from moeflow.apps.train import _hf_rank, hf_train_loop, validate_train_args
    from moeflow.launch import launch
    from tests.parallel.test_parallelize import save_tiny

    model_dir = save_tiny("qwen3_moe", tmp_path / "hf")
    single = _hf_args(model_dir, steps=4)
    validate_train_args(single, world=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = hf_train_loop(single, verbose=False)["losses"]
    finally:
        torch.set_num_threads(threads)
    for flags in (
        dict(dispatcher="dedup", nodes=2, dense="replicate"),
        dict(dispatcher="hierarchical", nodes=2, esp=2, schedule="s2"),
    ):
        a = _hf_args(model_dir, steps=4, **flags)
        validate_train_args(a, world=4)
        assert a.ranks_per_node == 2
        out = launch(_hf_rank, 4, a, force=True, timeout_s=180, progress=False)
        losses = out[0]["losses"]
        assert max(abs(x - y) for x, y in zip(losses, ref)) < 1e-5, (flags, losses, ref)
    bad = _hf_args(model_dir, esp=4, nodes=2)
    with pytest.raises(DistributedConfigError, match="ESP group"):
        validate_train_args(bad, world=4)
    with pytest.raises(ConfigError, match="--dtype"):
        validate_train_args(_hf_args(model_dir, dtype="bfloat16"), world=4)


@pytest.mark.slow
def test_torchrun_module_fine_tunes_a_model_dir(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    pytest.importorskip("transformers")
    from tests.parallel.test_parallelize import save_tiny

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun not installed next to this Python")
    model_dir = save_tiny("mixtral", tmp_path / "hf")
    out = subprocess.run(
        [
            torchrun,
            "--nproc-per-node",
            "4",
            "-m",
            "moeflow.apps.train",
            "--model",
            model_dir,
            "--steps",
            "3",
            "--batch-size",
            "4",
            "--seq-len",
            "8",
            "--corpus-bytes",
            "20000",
            "--checkpoint-dir",
            str(tmp_path / "c"),
            "--export",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "summary: steps 1..3" in out.stdout
    assert (tmp_path / "c" / ".metadata").exists()
    assert (tmp_path / "out" / "config.json").exists()


# -- --checkpoint-dir / --resume with damaged, hostile or foreign checkpoints ----------------
def _cli(*argv) -> tuple[int, list[str]]:
    """``moeflow train ...`` through the command line's error boundary: (exit code, stderr)."""
    import contextlib
    import io

    from moeflow import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli.main(["train", *map(str, argv)])
    return code, err.getvalue().strip().splitlines()


def _resume_argv(model_dir, ckpt, nproc=1, steps=2):
    return [
        "--model", model_dir, "--nproc", nproc, "--steps", steps, "--batch-size", 4,
        "--seq-len", 8, "--r-fwd", 1, "--r-bwd", 1, "--corpus-bytes", 4000,
        "--checkpoint-dir", ckpt, "--resume",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def _single_ckpt_once(tmp_path_factory):
    pytest.importorskip("transformers")
    from tests.parallel.test_parallelize import save_tiny

    root = tmp_path_factory.mktemp("single")
    model_dir = save_tiny("qwen3_moe", root / "hf")
    ckpt = root / "ckpt"
    code, err = _cli(*_resume_argv(model_dir, ckpt, steps=1))
    assert code == 0, err
    assert (ckpt / "state.pt").exists() and (ckpt / "moeflow_layout.json").exists()
    return model_dir, ckpt


@pytest.fixture
def single_ckpt(_single_ckpt_once, tmp_path):
    """A tiny model directory and (a copy of) a one-process checkpoint of it after 1 step."""
    import shutil

    model_dir, ckpt = _single_ckpt_once
    shutil.copytree(ckpt, tmp_path / "ckpt")
    return model_dir, tmp_path / "ckpt"


def test_resume_refuses_code_in_state_pt(single_ckpt, code_pickle):
    import torch

    model_dir, ckpt = single_ckpt
    state = torch.load(ckpt / "state.pt", weights_only=True)
    state["extra"]["sampler"] = code_pickle.payload
    torch.save(state, ckpt / "state.pt")
    code, err = _cli(*_resume_argv(model_dir, ckpt))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("moeflow: CorruptDataError: ") and "state.pt" in err[0]
    assert not code_pickle.marker.exists()


def test_resume_with_another_layout_names_what_differs(single_ckpt):
    model_dir, ckpt = single_ckpt
    code, err = _cli(*_resume_argv(model_dir, ckpt, nproc=2))
    assert code == 2 and len(err) == 1, err
    assert "moeflow: InputError: " in err[0] and "nproc 1 (this run: 2)" in err[0]
    code, err = _cli(*_resume_argv(model_dir, ckpt), "--dispatcher", "capacity")
    assert code == 2 and "dispatcher 'a2a' (this run: 'capacity')" in err[0], err
    (ckpt / "moeflow_layout.json").unlink()  # as saved before layouts were recorded
    code, err = _cli(*_resume_argv(model_dir, ckpt, nproc=2))
    assert code == 2 and len(err) == 1 and "saved by a single-process run" in err[0], err


def test_resume_clears_a_stale_temp_dir_and_continues(single_ckpt):
    """A save killed mid-write left ``ckpt.tmp`` with part of the state: the resume deletes it
    and goes on from the published checkpoint."""
    model_dir, ckpt = single_ckpt
    tmp = ckpt.parent / "ckpt.tmp"
    tmp.mkdir()
    (tmp / "state.pt").write_bytes(b"half written")
    code, err = _cli(*_resume_argv(model_dir, ckpt, steps=2))
    assert code == 0, err
    assert not tmp.exists() and (ckpt / "state.pt").exists()
    assert any("2/2" in line for line in err)


def test_sharded_resume_with_code_in_its_objects_stops_in_the_parent(
    _single_ckpt_once, tmp_path, code_pickle
):
    """``--nproc 2 --resume`` reads the DCP checkpoint's replicated objects before forking:
    a crafted pickle there is a CorruptDataError, exit 2, and never runs."""
    import torch

    from tests._dist import run_ranks
    from tests.parallel.test_checkpoint import _save_rank

    model_dir, _ = _single_ckpt_once
    ckpt = tmp_path / "ckpt"
    run_ranks(_save_rank, 1, str(ckpt), None, timeout_s=60)  # a DCP checkpoint, no layout
    torch.save({"param_groups": [], "extra": code_pickle.payload}, ckpt / "moeflow_objects.pt")
    code, err = _cli(*_resume_argv(model_dir, ckpt, nproc=2))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("moeflow: CorruptDataError: ") and "moeflow_objects.pt" in err[0]
    assert not code_pickle.marker.exists()


def _tuned_run(rank, world, corpus):
    import io
    from contextlib import redirect_stdout

    from moeflow.apps.train import train_loop
    from moeflow.comm import Topology

    out = []
    for k in (0, 2):
        a = _args(steps=6, dispatcher="a2a", r_fwd=2, r_bwd=2, tune_degrees=k, log_every=100)
        a._corpus = corpus
        buf = io.StringIO()
        with redirect_stdout(buf):
            res = train_loop(a, topology=Topology.explicit(world, 1), verbose=True)
        # the model is not returned; the degrees are printed by rank 0 when tuned
        out.append((res["losses"], buf.getvalue()))
    return out


def test_tune_degrees_times_earlier_batches_and_leaves_the_training_unchanged():
    from moeflow.models.demo import load_corpus

    corpus = load_corpus(max_bytes=100_000)
    res = run_ranks(_tuned_run, 2, corpus, timeout_s=240)
    (plain, _), (tuned, log) = res[0]
    assert len(plain) == len(tuned) == 6
    # tuning runs forward + backward only and restores the gradients: the same curve
    # (another degree pair only reorders float sums)
    assert max(abs(a - b) for a, b in zip(plain, tuned)) < 1e-4, (plain, tuned)
    line = [ln for ln in log.splitlines() if ln.startswith("tuned (r_fwd, r_bwd)")]
    assert len(line) == 1
    for pair in ("(2, 2)", "(1, 1)", "(4, 4)", "(8, 8)"):
        assert pair in line[0].split(":", 1)[1]


@pytest.mark.parametrize("k", [-1, 65, 1.5])
def test_tune_degrees_refuses_bad_counts(k):
    from moeflow.apps.train import validate_train_args

    with pytest.raises(ConfigError):
        validate_train_args(_args(tune_degrees=k), 1)
