"""The JSON report (schema), the table, the PNG and the Chrome trace (HTA's rank metadata)."""

import copy
import json

import pytest

from moeflow.apps.bench import BenchJob, Setting, Shape, bench, format_table, validate_report
from moeflow.apps.bench.report import with_rank_metadata, write_json, write_png, write_trace
from moeflow.errors import InputError

TINY = {
    "dim": 32,
    "num_layers": 1,
    "num_heads": 4,
    "num_experts": 4,
    "top_k": 2,
    "ffn_hidden_size": 64,
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    trace_dir = tmp_path_factory.mktemp("traces")
    job = BenchJob(
        kind="demo",
        mode="train",
        shape=Shape(batch=2, seq_len=16),
        dims=TINY,
        settings=[Setting(), Setting(kernel="bmm")],
        warmup=1,
        steps=1,
        unprofiled=1,
        peak_flops={"float32": 1e11},
        progress=False,
        trace_dir=str(trace_dir),
    )
    return bench(job), trace_dir


def test_report_follows_the_schema(report, tmp_path):
    rep, _ = report
    validate_report(rep)
    path = tmp_path / "r.json"
    write_json(rep, path)
    back = json.loads(path.read_text())
    validate_report(back)
    assert [s["setting"]["kernel"] for s in back["settings"]] == ["grouped_mm", "bmm"]
    s = back["settings"][0]
    assert s["status"] == "ok" and s["step_ms"] > 0
    assert s["flops"]["counted"] == s["flops"]["hardware"] == s["flops"]["model"]
    assert back["settings"][1]["flops"]["counted"] >= back["settings"][1]["flops"]["model"]
    assert 0 < s["mfu"] < 1 and back["peak_source"] == "stated"
    assert sum(b["ms"] for b in s["breakdown"]) == pytest.approx(s["profiled_step_ms"])


@pytest.mark.parametrize("breakage", ["format", "missing", "phase", "row", "type", "status"])
def test_schema_violations_are_named(report, breakage):
    rep = copy.deepcopy(report[0])
    s = rep["settings"][0]
    if breakage == "format":
        rep["format"] = "moeflow.bench/0"
    elif breakage == "missing":
        del s["step_ms"]
    elif breakage == "phase":
        s["breakdown"][0]["phase"] = "sideways"
    elif breakage == "row":
        s["breakdown"][0]["row"] = "mystery"
    elif breakage == "type":
        rep["nproc"] = "1"
    else:
        s["status"] = "maybe"
    with pytest.raises(InputError, match="bench report"):
        validate_report(rep)


def test_table_names_every_setting_and_row(report):
    text = format_table(report[0])
    assert "grouped_mm/fp32/rc-off/compile-off" in text and "bmm/fp32" in text
    for row in ("attention", "moe_experts", "norm", "embedding"):
        assert row in text


def test_png(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "b.png"
    write_png(report[0], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_trace_carries_rank_metadata(report):
    _, trace_dir = report
    files = sorted(trace_dir.glob("*/rank0.json"))
    assert len(files) == 2
    t = json.loads(files[0].read_text())
    assert t["distributedInfo"] == {"backend": "none", "rank": 0, "world_size": 1}
    names = {e.get("name") for e in t["traceEvents"]}
    assert "moeflow.bench::step" in names
    assert any(n.startswith("moeflow.bench::module::moe_experts::") for n in names if n)


def test_holistic_trace_analysis_loads_the_traces(tmp_path, report):
    """Two ranks' files in one directory: HTA maps each to its rank and parses its events."""
    hta = pytest.importorskip("hta.trace_analysis")
    _, trace_dir = report
    src = json.loads(sorted(trace_dir.glob("*/rank0.json"))[0].read_text())
    src.pop("distributedInfo")
    for r in (0, 1):
        write_trace(src, tmp_path, r, 2, "gloo")
    analyzer = hta.TraceAnalysis(trace_dir=str(tmp_path))
    assert sorted(analyzer.t.traces) == [0, 1]
    df = analyzer.t.get_trace(1)
    assert len(df) > 0
    symbols = analyzer.t.symbol_table.sym_index
    assert "moeflow.bench::step" in symbols


def test_rank_metadata_does_not_touch_the_input():
    t = {"traceEvents": []}
    out = with_rank_metadata(t, 3, 4, "gloo")
    assert "distributedInfo" not in t and out["distributedInfo"]["rank"] == 3
