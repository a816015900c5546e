"""``moeflow serve``: the command is registered, a missing ``[serve]`` extra names the pip
command, a bad path is exit 2 with one line, and SIGTERM drains the requests in flight."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moeflow.cli import main
from tests.serving.serving_live import wait_healthy

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_serve_is_a_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("MODEL_DIR", "--host", "--port", "--kv-cache-gib", "--max-prefill-tokens"):
        assert opt in out


@pytest.mark.parametrize("module", ["uvicorn", "fastapi"])
def test_missing_extra_names_the_pip_command(monkeypatch, capsys, tmp_path, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    assert main(["serve", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert 'pip install "moeflow[serve]"' in err and "Traceback" not in err


def test_build_app_without_fastapi_names_the_extra(monkeypatch):
    from moeflow.serving.openai_api import build_app

    monkeypatch.setitem(sys.modules, "fastapi", None)
    with pytest.raises(ImportError, match=r'pip install "moeflow\[serve\]"'):
        build_app(None)


def test_bad_model_dir_is_bad_input(capsys, tmp_path):
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    assert main(["serve", str(tmp_path / "nope"), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moeflow: ")
    assert main(["serve", str(tmp_path), "--block-size", "0"]) == 2
    assert "block_size" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_drains_streams_in_flight(checkpoint):
    httpx = pytest.importorskip("httpx")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "moeflow.cli", "serve", str(checkpoint[1]), "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        cmd + ["--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_healthy(proc, url, poll_s=0.1)
        n_streams, n_tokens = 6, 90
        streaming = threading.Barrier(n_streams + 1)
        done = {}

        def stream(i):
            body = {
                "prompt": "hello",
                "max_tokens": n_tokens,
                "stream": True,
                "temperature": 0,
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
            events = []
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        events.append(json.loads(line[len("data: ") :]))
                        if len(events) == 1:
                            streaming.wait()
                    elif line == "data: [DONE]":
                        done[i] = (events, time.monotonic())

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(n_streams)]
        for t in threads:
            t.start()
        streaming.wait(60)  # every stream has its first token
        t_term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 143 and "terminated (SIGTERM)" in proc.stderr.read()
    assert len(done) == n_streams
    for events, _ in done.values():
        assert events[-1]["usage"]["completion_tokens"] == n_tokens
        assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert max(t for _, t in done.values()) > t_term  # they were in flight at the signal


def test_a_taken_port_is_one_line_and_exit_1(capsys, tmp_path):
    import socket

    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        # the port is checked before the model directory is read
        assert main(["serve", str(tmp_path / "nope"), "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use" in err[0]
