"""benchmarks/peers_ep.py: the moeflow side runs a tiny cell; absent peers are reported.

The full comparison needs the peers' virtual environment (``benchmarks/peers/setup_env.sh``)
and, for the emulated cluster, root; those cases skip with the reason when unavailable.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))

import emulated_cluster as ec  # noqa: E402
import peers_ep  # noqa: E402

TINY = [
    "--tokens",
    "32",
    "--dim",
    "32",
    "--ffn",
    "64",
    "--experts",
    "4",
    "--rounds",
    "1",
    "--steps",
    "2",
    "--warmup",
    "0",
    "--no-record",
    "--quiet",
]


def _args(*extra):
    return peers_ep.build_parser().parse_args(["run", *TINY, *extra])


@pytest.mark.dist
def test_moeflow_two_ranks_positive_and_absent_peers_reported():
    absent = [p for p in peers_ep.PEERS if importlib.util.find_spec(p) is None]
    if not absent:
        pytest.skip("every peer is installed in this interpreter; the absent path is untested")
    args = _args("--cells", "lo2", "--python", sys.executable, "--impls", "moeflow", *absent)
    res = peers_ep.run(args)
    cell = res["cells"]["lo2"]
    assert cell["world"] == 2
    for peer in absent:
        st = cell["impls"][peer]["status"]
        assert st.startswith("not installed: "), st
        assert "No module named" in st and peer in st, st
        assert res["probe"][peer] is not None
    assert cell["impls"]["moeflow"]["status"] == "ok"
    rows = {r["variant"]: r for r in cell["rows"]}
    fixed = [f"moeflow-a2a-r{r}" for r in peers_ep.FIXED_DEGREES]
    for v in ("moeflow-capacity", "moeflow-a2a", "moeflow-2dh", "moeflow-planned", *fixed):
        assert rows[v]["tokens_per_s"] > 0 and rows[v]["steps"] == 2, rows
    assert rows[peers_ep.DROPLESS_VARIANT]["steps"] == 2
    # only the planned row's target can be formed without peers
    assert [t["target"] for t in cell["targets"]] == ["planned / best fixed degree"]
    planned = cell["impls"]["moeflow"]["meta"]["planned"]
    assert planned["r_fwd"] >= 1 and planned["r_bwd"] >= 1
    assert cell["ratios"] == {}  # no peer ran, so no ratio
    md = peers_ep.record_markdown(res, ["run", *TINY])
    for peer in absent:
        assert f"- {peer}: not installed" in md


def test_ratios_pair_only_matching_semantics():
    rows = [
        {"variant": v, "tokens_per_s": t}
        for v, t in (
            ("deepspeed", 100.0),
            ("tutel", 200.0),
            ("torchtitan", 50.0),
            ("moeflow-a2a", 300.0),
            (peers_ep.DROPLESS_VARIANT, 25.0),
        )
    ]
    r = peers_ep.ratios(rows)
    assert r == {
        ("moeflow-a2a", "deepspeed"): 3.0,
        ("moeflow-a2a", "tutel"): 1.5,
        (peers_ep.DROPLESS_VARIANT, "torchtitan"): 0.5,
    }
    # a capacity-dropping GELU layer is never compared with torchtitan's dropless SwiGLU
    assert ("moeflow-a2a", "torchtitan") not in r


def test_summarize_counts_every_rank_tokens():
    res = {"world": 4, "impls": {"tutel": {"times": {"tutel": [0.5, 0.1, 0.2, 0.4]}}}}
    (row,) = peers_ep.summarize(res, tokens=100, steps=2)
    assert row["median_ms"] == pytest.approx(300.0) and row["min_ms"] == pytest.approx(100.0)
    assert row["max_ms"] == pytest.approx(500.0)
    assert row["round_median_ms"] == pytest.approx([300.0, 300.0])
    assert row["tokens_per_s"] == pytest.approx(4 * 100 / 0.3)


def _row(v, *round_ms):
    return {
        "variant": v,
        "median_ms": sorted(round_ms)[len(round_ms) // 2],
        "round_median_ms": list(round_ms),
    }


def test_targets_use_the_capacity_row_and_the_best_fixed_degree():
    rows = [
        _row("deepspeed", 120.0, 100.0, 110.0),
        _row("tutel", 220.0, 200.0, 210.0),
        _row("moeflow-capacity", 100.0, 100.0, 100.0),
        _row("moeflow-a2a", 90.0, 90.0, 90.0),
        _row("moeflow-a2a-r2", 60.0, 40.0, 50.0),  # the best fixed degree
        _row("moeflow-a2a-r4", 70.0, 70.0, 70.0),
        _row("moeflow-planned", 55.0, 50.0, 50.0),
    ]
    t = {x["target"]: x for x in peers_ep.targets(rows)}
    cap = t["capacity / DeepSpeed-MoE"]
    assert cap["mine"] == "moeflow-capacity" and cap["ratio"] == pytest.approx(1.1)
    assert cap["round_ratios"] == pytest.approx([1.2, 1.0, 1.1]) and cap["met"]
    assert t["capacity / Tutel"]["ratio"] == pytest.approx(2.1)
    plan = t["planned / best fixed degree"]
    assert plan["ref"] == "moeflow-a2a-r2" and plan["ratio"] == pytest.approx(1.0) and plan["met"]
    assert "bf16 dropless / torchtitan" not in t  # neither side ran
    # one process: the drop layer itself is the capacity row; a loss is marked
    single = [_row("deepspeed", 90.0), _row("moeflow", 100.0)]
    (only,) = peers_ep.targets(single)
    assert only["mine"] == "moeflow" and not only["met"]


def test_emulated_cluster_without_root_skips_with_reason(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    reason = ec.unavailable()
    assert reason is not None and "root" in reason
    assert ec.main(["up", "2", "1gbit"]) == 0
    assert "skipped" in capsys.readouterr().out
    with pytest.raises(ec.ClusterError, match="root"):
        ec.up(2, "1gbit")
    # the benchmark reports the emulated cells as skipped, launching nothing
    res = peers_ep.run_cell(peers_ep.CELLS["emu2x1-1gbit"], ["moeflow"], _args(), {"moeflow": None})
    assert res["skipped"].startswith("emulated cluster unavailable") and not res["impls"]


def _root_reason():
    return ec.unavailable()


_SERVER = """
import socket
s = socket.socket()
s.bind((ADDR, 5999))
s.listen(1)
c, _ = s.accept()
n = 0
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    n += len(b)
    if n >= NBYTES:
        break
c.sendall(b"k")   # the ack: the client's clock stops when every byte has arrived
print(n)
"""
_CLIENT = """
import socket, time
c = socket.create_connection((ADDR, 5999))
t = time.time()
c.sendall(b"x" * NBYTES)
c.recv(1)
print(time.time() - t)
c.close()
"""


@pytest.mark.slow
@pytest.mark.skipif(_root_reason() is not None, reason=f"emulated cluster: {_root_reason()}")
def test_emulated_link_is_shaped():
    """4 MiB from node 1 to node 0 over a 100 Mbit/s link take about 0.34 s, not ~2 ms."""
    ec.up(2, "100mbit")
    addr, n = repr(ec.addr(0)), 4 << 20
    try:

        def code(src):
            return src.replace("ADDR", addr).replace("NBYTES", str(n))

        server = subprocess.Popen(
            ec.node_command(0, [sys.executable, "-c", code(_SERVER)]),
            stdout=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.0)
        client = subprocess.run(
            ec.node_command(1, [sys.executable, "-c", code(_CLIENT)]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        out, _ = server.communicate(timeout=60)
        assert int(out) == n
        mbit_s = n * 8 / 1e6 / float(client.stdout)
        assert 50 < mbit_s < 150, mbit_s
    finally:
        ec.down()
    assert not ec.namespaces()


VENV = BENCH.parent / ".venv-peers" / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not VENV.exists(), reason="no peers venv (benchmarks/peers/setup_env.sh)")
def test_every_peer_runs_in_the_peers_venv():
    res = peers_ep.run(_args("--cells", "lo2", "--python", str(VENV)))
    cell = res["cells"]["lo2"]
    for impl in peers_ep.IMPLS:
        assert cell["impls"][impl]["status"] == "ok", cell["impls"][impl]
    assert {
        ("moeflow-a2a", "deepspeed"),
        ("moeflow-a2a", "tutel"),
        (peers_ep.DROPLESS_VARIANT, "torchtitan"),
    } <= set(tuple(k.split("|")) for k in cell["ratios"])
