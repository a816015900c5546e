"""The local launcher: refuses bad ``nproc`` before forking, one line per failure, deadlines."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pytest

from moeflow.errors import CommTimeoutError, ConfigError
from moeflow.launch import RankFailed, check_nproc, launch, max_ranks


@pytest.fixture
def no_fork(monkeypatch):
    """Any fork fails the test: validation must happen in the parent first."""

    def refuse():
        raise AssertionError("a process was forked")

    monkeypatch.setattr(os, "fork", refuse)


def _no_children():
    deadline = time.monotonic() + 5
    while multiprocessing.active_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    return not multiprocessing.active_children()


@pytest.mark.parametrize("n", [0, -1, "cap+1", 1000, 2.0, True])
def test_bad_nproc_refused_before_any_fork(no_fork, n):
    n = max_ranks() + 1 if n == "cap+1" else n
    if n == 1000 and max_ranks() >= 1000:
        pytest.skip("a machine with 250+ CPUs accepts 1000 ranks")
    t0 = time.monotonic()
    with pytest.raises(ConfigError) as ei:
        launch(lambda r, w: r, n, init_group=False, progress=False)
    assert time.monotonic() - t0 < 3.0
    assert "--nproc" in str(ei.value)
    if isinstance(n, int) and n > 1 and not isinstance(n, bool):
        # the message says the cap and how to go past it
        assert str(max_ranks()) in str(ei.value) and "--force-nproc" in str(ei.value)
    assert not multiprocessing.active_children()


def test_force_lifts_the_cap_only():
    cap = max_ranks()
    assert check_nproc(cap) == cap
    assert check_nproc(cap + 1, force=True) == cap + 1
    with pytest.raises(ConfigError):
        check_nproc(0, force=True)


def _ident(rank, world, scale):
    return rank * scale + world


def test_results_in_rank_order_with_gloo(capsys):
    def fn(rank, world):
        import torch
        import torch.distributed as dist

        t = torch.tensor([float(rank + 1)])
        dist.all_reduce(t)
        return rank, float(t)

    assert launch(fn, 3, stall_timeout_s=20, timeout_s=60) == [(0, 6.0), (1, 6.0), (2, 6.0)]
    err = capsys.readouterr().err
    assert "starting 3 ranks" in err and "3 ranks started" in err  # never silent
    assert launch(_ident, 2, 10, init_group=False, progress=False) == [2, 12]


def _raise_on_rank_1(rank, world):
    if rank == 1:
        raise ValueError("bad shard 7")
    time.sleep(60)  # the others would hang: the launcher must end them


def test_rank_error_is_one_line_naming_the_rank_and_ends_the_others(capsys, monkeypatch):
    monkeypatch.delenv("MOEFLOW_DEBUG", raising=False)
    t0 = time.monotonic()
    with pytest.raises(RankFailed) as ei:
        launch(_raise_on_rank_1, 3, init_group=False, progress=False, stall_timeout_s=30)
    assert time.monotonic() - t0 < 10
    e = ei.value
    assert e.rank == 1 and e.kind == "ValueError"
    assert str(e) == "rank 1 failed: ValueError: bad shard 7"
    assert "Traceback" in e.remote_traceback
    assert "Traceback" not in capsys.readouterr().err  # tracebacks only with --debug
    assert _no_children()


def test_debug_prints_the_rank_traceback(capsys, monkeypatch):
    monkeypatch.setenv("MOEFLOW_DEBUG", "1")
    with pytest.raises(RankFailed):
        launch(_raise_on_rank_1, 2, init_group=False, progress=False)
    err = capsys.readouterr().err
    assert "traceback of rank 1" in err and "bad shard 7" in err


def _stop_rank_1(rank, world):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    time.sleep(60)


def test_stopped_rank_is_named_and_the_rest_ended():
    t0 = time.monotonic()
    with pytest.raises(CommTimeoutError) as ei:
        launch(_stop_rank_1, 3, init_group=False, progress=False, stall_timeout_s=0.5)
    assert time.monotonic() - t0 < 8
    assert "rank 1" in str(ei.value)
    assert _no_children()  # the stopped rank too (SIGKILL)


def _stop_rank_0_then_collective(rank, world):
    import torch

    from moeflow.comm.collectives import all_reduce

    if rank == 0:
        os.kill(os.getpid(), signal.SIGSTOP)
    all_reduce(torch.ones(1), None, "test all-reduce", 0.5)


def test_peer_timeout_blames_the_stopped_rank():
    # rank 1 hits CommTimeoutError after 0.5 s; the stopped rank 0 is the cause
    t0 = time.monotonic()
    with pytest.raises(CommTimeoutError) as ei:
        launch(_stop_rank_0_then_collective, 2, progress=False, stall_timeout_s=30)
    assert time.monotonic() - t0 < 10
    assert "rank 0" in str(ei.value)
    assert _no_children()


def test_rank_that_dies_is_named():
    def die(rank, world):
        if rank == 2:
            os._exit(3)
        time.sleep(60)

    with pytest.raises(
        RankFailed,
        match=r"rank 2 failed: exited without a result \(exit "
        r"code 3\)",
    ):
        launch(die, 3, init_group=False, progress=False)
    assert _no_children()


def test_overall_deadline():
    with pytest.raises(CommTimeoutError, match=r"ranks \[0, 1\] did not finish within 0.5 s"):
        launch(lambda r, w: time.sleep(60), 2, init_group=False, progress=False, timeout_s=0.5)
    assert _no_children()


def test_train_config_errors_raised_before_fork(no_fork):
    from moeflow.apps.train import main
    from moeflow.errors import DistributedConfigError

    # 16 sequences do not split over 3 ranks (this used to fail once per rank, after forking)
    with pytest.raises(ConfigError, match="batch"):
        main(["--nproc", "3"])
    with pytest.raises(DistributedConfigError, match="num_experts"):
        main(["--nproc", "4", "--experts", "6"])
    for bad in (
        ["--nproc", "0"],
        ["--nproc", "-1"],
        ["--steps", "0"],
        ["--nproc", str(max_ranks() + 1)],
    ):
        with pytest.raises(ConfigError):
            main(bad)


def test_cli_nproc_3_prints_one_line():
    r = subprocess.run(
        [sys.executable, "-m", "moeflow.cli", "train", "--nproc", "3"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "batch" in lines[0], r.stderr


def test_ranks_exit_when_the_launcher_is_killed(tmp_path):
    code = (
        "import os, sys, time\n"
        "from moeflow.launch import launch\n"
        "def fn(rank, world):\n"
        f"    open(os.path.join({str(tmp_path)!r}, str(rank)), 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "launch(fn, 2, init_group=False, progress=False, stall_timeout_s=0.5)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code])
    try:
        deadline = time.monotonic() + 30
        while len(list(tmp_path.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [int(p.read_text()) for p in tmp_path.iterdir() if p.read_text()]
        assert len(pids) == 2
    finally:
        parent.kill()
        parent.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 5
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(alive, pids))  # orphaned ranks do not linger
