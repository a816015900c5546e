"""A real uvicorn server on a free local port, for the serving tests and the load generator's
(imported as ``tests.serving.serving_live``: a bare ``conftest`` import resolves to whichever
test directory's conftest was loaded first)."""

import socket
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn running ``app`` on a thread; ``url`` to reach it."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(20)


def greedy_token_ids(url: str, prompt: str, n: int) -> list[int]:
    """The ``n`` greedy token ids a live server at ``url`` completes ``prompt`` with."""
    import httpx

    body = {
        "prompt": prompt,
        "max_tokens": n,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
    }
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def wait_healthy(proc, url: str, timeout_s: float = 120, poll_s: float = 0.1) -> None:
    """Wait until the server process ``proc`` answers 200 on ``url``/health; fails the test
    if the process exits or ``timeout_s`` passes first."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(poll_s)
