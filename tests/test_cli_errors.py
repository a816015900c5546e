"""The command line's error boundary: one stderr line and a documented exit code."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from moeflow import cli
from moeflow.errors import (
    CommTimeoutError,
    ConfigError,
    CorruptDataError,
    DistributedConfigError,
    InputError,
)
from tests._proc import default_sigint

FAKE = textwrap.dedent("""
    import time
    from moeflow.errors import ConfigError, CommTimeoutError

    def add_arguments(p):
        p.add_argument("--mode", default="ok")

    def run(args):
        if args.mode == "config":
            raise ConfigError("--widgets", 0, "a positive int")
        if args.mode == "timeout":
            raise CommTimeoutError("all_to_all on rank 1 did not finish in 5 s")
        if args.mode == "missing":
            open("/nonexistent-dir/x.bin")
        if args.mode == "bug":
            return 1 / 0
        if args.mode == "sleep":
            print("ready", flush=True)
            try:
                time.sleep(60)
            finally:
                print("cleaned up", flush=True)
        return 0
""")


@pytest.fixture
def fake_command(tmp_path, monkeypatch):
    (tmp_path / "moeflow_fake_cmd.py").write_text(FAKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "fake", ("moeflow_fake_cmd", "a test command"))
    monkeypatch.setenv(cli.DEBUG_ENV, "0")  # restored after the test, whatever main() sets
    return tmp_path


@pytest.mark.parametrize(
    "exc, code",
    [
        (ConfigError("x", 0, "a positive int"), 2),
        (InputError("bad"), 2),
        (CorruptDataError("bad"), 2),
        (DistributedConfigError("bad"), 2),
        (CommTimeoutError("slow"), 1),
        (FileNotFoundError(errno.ENOENT, "No such file or directory", "a.st"), 2),
        (OSError(errno.ENOSPC, "No space left on device"), 1),
        (KeyboardInterrupt(), 130),
        (cli.Terminated(), 143),
        (ZeroDivisionError("x"), 1),
        (ImportError('x needs numba: run pip install "moeflow[compress]"'), 1),
    ],
)
def test_exit_codes(exc, code):
    assert cli.exit_code(exc) == code
    assert "\n" not in cli.error_line(exc)


@pytest.mark.parametrize(
    "mode, code, needle",
    [
        ("ok", 0, None),
        ("config", 2, "ConfigError: --widgets=0 is not allowed: a positive int"),
        ("timeout", 1, "CommTimeoutError: all_to_all on rank 1"),
        ("missing", 2, "No such file or directory: /nonexistent-dir/x.bin"),
        ("bug", 1, "internal error: ZeroDivisionError"),
    ],
)
def test_boundary_in_process(fake_command, capsys, mode, code, needle):
    assert cli.main(["fake", "--mode", mode]) == code
    err = capsys.readouterr().err
    if needle is None:
        assert err == ""
    else:
        assert err.count("\n") == 1 and needle in err and "Traceback" not in err


def test_missing_extra_reads_as_install_hint():
    line = cli.error_line(ImportError('compress needs numba: run pip install "moeflow[compress]"'))
    assert line.startswith("compress needs numba") and "internal error" not in line


def test_debug_flag_anywhere_prints_traceback(fake_command, capsys):
    assert cli.main(["fake", "--mode", "config", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "ConfigError" in err
    assert os.environ.get(cli.DEBUG_ENV) == "1"  # launched ranks see it too


def test_usage_error_is_exit_2(fake_command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["fake", "--no-such-flag"])
    assert e.value.code == 2


def _spawn_sleeper(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    code = (
        "import sys; from moeflow import cli; "
        "cli.COMMANDS['fake'] = ('moeflow_fake_cmd', 'x'); "
        "sys.exit(cli.main(['fake', '--mode', 'sleep']))"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize(
    "sig, code, line",
    [(signal.SIGINT, 130, "moeflow: interrupted"), (signal.SIGTERM, 143, "moeflow: terminated")],
)
def test_signals_unwind_and_exit_with_code(fake_command, sig, code, line):
    p = _spawn_sleeper(fake_command)
    time.sleep(0.2)
    p.send_signal(sig)
    out, err = p.communicate(timeout=30)
    assert p.returncode == code
    assert "cleaned up" in out  # finally blocks ran: temp files can be removed
    assert err.strip().startswith(line) and "Traceback" not in err


def test_real_command_bad_path_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    r = subprocess.run(
        [sys.executable, "-m", "moeflow.cli", "inspect", str(tmp_path / "missing.mfz")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "missing.mfz" in r.stderr


def _every_error_class() -> list[type]:
    import inspect

    import moeflow.errors as errors
    from moeflow.geo.pipeline import GeoJobFailed
    from moeflow.launch import RankFailed

    found = [
        c
        for c in vars(errors).values()
        if inspect.isclass(c) and issubclass(c, errors.MoeflowError)
    ]
    return sorted(set(found) | {RankFailed, GeoJobFailed}, key=lambda c: c.__name__)


#: constructor arguments of the classes whose signature is not ``(message)``
_ERROR_ARGS = {
    "ConfigError": ("top_p", float("nan"), "a float in (0, 1]"),
    "RankFailed": (1, "InputError", "bad  request\nline", "Traceback ..."),
}


@pytest.mark.parametrize("cls", _every_error_class(), ids=lambda c: c.__name__)
def test_every_error_survives_pickling(cls):
    import pickle

    err = cls(*_ERROR_ARGS.get(cls.__name__, ("request 3: prompt is empty",)))
    err.note = "set after construction"
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is cls
    assert str(back) == str(err)
    assert back.note == "set after construction"
    assert {k: v for k, v in vars(back).items() if k != "value"} == {
        k: v for k, v in vars(err).items() if k != "value"
    }


def test_config_error_keeps_its_fields_through_pickle():
    import pickle

    back = pickle.loads(pickle.dumps(ConfigError("a", 1, "b")))
    assert (back.field, back.value, back.allowed) == ("a", 1, "b")
    assert str(back) == "a=1 is not allowed: b"


def _moeflow(*argv, **kw):
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    return subprocess.run(
        [sys.executable, "-m", "moeflow.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        **kw,
    )


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["serve-bench", "--timeout", "0"], "--timeout"),
        (["serve-bench", "--requests", "100000000000"], "--requests"),
        (["serve-bench", "--demo-layers", "1000000"], "--demo-layers"),
        (["geo", "plan", "--devices", "x.json", "--layers", "100000"], "--layers"),
        (["geo", "train", "--dim", "10000000"], "--dim"),
        (["geo", "train", "--stages", "0"], "--stages"),
    ],
)
def test_bad_sizes_and_timeouts_exit_2_before_any_work(argv, flag):
    t0 = time.monotonic()
    r = _moeflow(*argv)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.count("\n") == 1 and flag in r.stderr and "ConfigError" in r.stderr
    assert "serve-bench: this host" not in r.stdout  # nothing was profiled
    assert "starting" not in r.stderr  # nothing was forked
    assert time.monotonic() - t0 < 30


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(x) for x in f.read().split()]


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc")
def test_geo_train_stopped_rank_is_detected_within_the_timeout():
    timeout = 3.0
    env = {k: v for k, v in os.environ.items() if k != cli.DEBUG_ENV}
    argv = ["geo", "train", "--stages", "2", "--steps", "1000000", "--timeout", str(timeout)]
    argv += ["--dim", "16", "--layers", "1", "--heads", "2", "--seq-len", "8"]
    argv += ["--microbatches", "2", "--microbatch-size", "1"]
    p = subprocess.Popen(
        [sys.executable, "-m", "moeflow.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        for line in p.stderr:
            if "ranks started" in line:
                break
        time.sleep(1.0)  # the ranks are training
        kids = _children(p.pid)
        assert len(kids) == 2 and p.poll() is None
        os.kill(kids[1], signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=60)
        waited = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 1, err
    assert "rank 1" in err and ("no progress" in err or "stopped" in err), err
    assert waited < timeout + 5, waited
