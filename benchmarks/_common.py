"""Small helpers shared by the benchmark scripts (imported as ``_common`` from benchmarks/;
the GPU scripts in benchmarks/gpu/ put benchmarks/ on ``sys.path`` first)."""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time


def cpu_name() -> str:
    """The CPU model name, for the machine line of a results record."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_isa() -> str:
    """ "AVX-512 BF16" or "AVX2 only", from the CPU flags (every CPU record states which)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        flags = ""
    return "AVX-512 BF16" if "avx512_bf16" in flags else "AVX2 only"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a loopback process group's rendezvous)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def collect_ranks(procs, timeout_s: float) -> tuple[dict | None, str | None]:
    """Wait for rank processes started with ``stdout=PIPE``; ``(rank 0's last JSON line,
    None)``, or ``(None, why)`` when a rank failed."""
    outs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    if any(p.returncode for p in procs):
        return None, f"a rank exited with {[p.returncode for p in procs]}"
    return json.loads([ln for ln in outs[0].splitlines() if ln.startswith("{")][-1]), None


# --------------------------------------------------------------------------- GPU scripts
def gpu_timer(smoke: bool, rep_ms: int = 40):
    """``ms(fn)``: milliseconds per call of ``fn``.

    On a GPU, the median of ``triton.testing.do_bench`` (10 ms warm-up, ``rep_ms`` of timed
    runs), which flushes the L2 cache between runs, so a weight is read from HBM as it would be
    in a model. In ``smoke`` mode (CPU, Triton interpreter) one call's wall time: the figure
    means nothing there, the run only exercises the code paths."""
    if smoke:

        def ms(fn) -> float:
            t = time.perf_counter()
            fn()
            return 1e3 * (time.perf_counter() - t)

        return ms
    import triton.testing

    def ms(fn) -> float:
        return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")

    return ms


def cpu_record_info(host: str, cmd: str) -> dict:
    """The fields a CPU benchmark record starts with: date (UTC), host label, machine with its
    instruction set, Python and torch versions, and the command."""
    import torch

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),
        "host": host,
        "machine": f"{cpu_name()} ({cpu_isa()})",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": cmd,
    }


def run_info(smoke: bool) -> dict:
    """Machine and software fields every GPU record starts with."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.is_available() and not smoke
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0) if gpu else f"cpu (smoke): {cpu_name()}",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0"),
        "command": " ".join(["python"] + sys.argv),
        "smoke": smoke,
    }


def write_record(out_dir: str, tag: str, info: dict, lines: list[str]) -> None:
    """Write ``<tag>.json`` (every number) and ``<tag>.md`` (the tables) into ``out_dir``,
    and print the markdown."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
        json.dump(info, f, indent=1)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, f"{tag}.md"), "w") as f:
        f.write(text)
    print(text, end="", flush=True)


def wait_for_server(proc: subprocess.Popen, url: str, name: str, timeout_s: float) -> str:
    """Poll ``url`` (an HTTP endpoint of the server ``proc`` started) until it answers 200;
    ``RuntimeError`` naming ``name`` when the process exits first or after ``timeout_s`` (then
    the server is stopped)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    stop_server(proc, 30)
    raise RuntimeError(f"{name} server did not answer within {timeout_s:.0f} s")


def stop_server(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM the server's process group (started with ``start_new_session=True``), then
    SIGKILL it if it has not exited within ``grace_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
