"""EP training follows the single-process run of the same model, seed and global batch."""

from __future__ import annotations

import argparse

import pytest
import torch

from tests._dist import run_ranks

pytestmark = pytest.mark.dist


def _args(**kw) -> argparse.Namespace:
    from moeflow.train import add_train_arguments
    p = argparse.ArgumentParser()
    add_train_arguments(p)
    a = p.parse_args([])
    # aux loss off: its statistics are per rank in EP and per global batch in one process
    base = dict(steps=20, batch_size=8, seq_len=32, dim=32, layers=2, experts=8, ffn=64,
                aux_loss_coef=0.0, max_seconds=1e9, timeout=60.0, lr=3e-3)
    base.update(kw)
    for k, v in base.items():
        setattr(a, k, v)
    return a


def _ep_run(rank, world, args_list, corpus):
    from moeflow.comm import Topology
    from moeflow.train import train_loop
    outs = []
    for a in args_list:
        a._corpus = corpus
        outs.append(train_loop(a, topology=Topology.explicit(world, 2), verbose=False)["losses"])
    return outs


def test_ep_training_matches_single_process_20_steps():
    from moeflow.demo import load_corpus
    from moeflow.train import train_loop
    corpus = load_corpus(max_bytes=100_000)
    single = _args()
    single._corpus = corpus
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks use one thread each; 2 threads on a busy box crawl
    try:
        ref = train_loop(single, verbose=False)["losses"]
    finally:
        torch.set_num_threads(threads)
    variants = [_args(dispatcher="a2a", r_fwd=2, r_bwd=4),
                _args(dispatcher="2dh", esp=2, r_fwd=4, r_bwd=1)]
    res = run_ranks(_ep_run, 4, variants, corpus, timeout_s=240)
    assert len(ref) == 20 and ref[-1] < ref[0] - 0.5  # it actually trains
    for losses in res[0]:
        assert len(losses) == 20
        worst = max(abs(a - b) for a, b in zip(losses, ref))
        assert worst < 2e-3, (worst, losses, ref)
    assert res[1] == res[0]  # every rank reports the same global loss


@pytest.mark.slow
def test_moeflow_train_cli_spawns_ranks(tmp_path):
    import subprocess
    import sys

    from moeflow.plan import LayerPlan, Plan
    plan = Plan(method="manual", perf={}, workload_table=[],
                layers=[LayerPlan(index=0, r_fwd=4, r_bwd=2), LayerPlan(index=1, r_fwd=2, r_bwd=1)])
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    out = subprocess.run([sys.executable, "-m", "moeflow.cli", "train", "--nproc", "4",
                          "--steps", "3", "--log-every", "1", "--dispatcher", "2dh",
                          "--plan", str(path), "--corpus-bytes", "100000"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[(4, 2), (2, 1)]" in out.stdout
    assert "tokens/s" in out.stdout and "summary: 3 steps" in out.stdout


def _tiny_train_argv(nproc, timeout):
    return ["--nproc", str(nproc), "--steps", "2", "--batch-size", "4", "--seq-len", "16",
            "--dim", "16", "--layers", "1", "--experts", "4", "--ffn", "16",
            "--corpus-bytes", "20000", "--timeout", str(timeout)]


@pytest.mark.parametrize("fault", ["sigstop", "raise"])
def test_train_launcher_ends_the_run_naming_the_rank(monkeypatch, fault):
    import os
    import signal
    import time

    import moeflow.train as train
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

    monkeypatch.setattr(train, "train_loop", faulty)   # the forked ranks inherit it
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
