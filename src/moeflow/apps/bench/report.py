"""``moeflow bench`` output: the terminal table, the JSON report, the PNG and the trace.

JSON report, ``format: "moeflow.bench/1"`` (checked by :func:`validate_report`)::

    {
      "format": "moeflow.bench/1",
      "mode": "train" | "decode",
      "model": {"kind": "demo" | "decoder" | "hf", "path": str | null,
                "params_total": int, "params_active": int, "dims": {...}},
      "shape": {"batch": int, "seq_len": int, "tokens": int},
      "machine": {"host": str, "threads": int, "torch": str},
      "peak_flops": float, "peak_source": str,
      "steps": {"warmup": int, "profiled": int, "unprofiled": int},
      "nproc": int,
      "settings": [{
        "setting": {"kernel": str, "dtype": str, "recompute": bool, "compile": bool,
                    "finetune": "full" | "lora", "zero3": bool, "quant": "none" | "int8",
                    "sdpa": str, "label": str},
        "status": "ok" | "failed", "error": str | null,
        "step_ms": float,            # median of the plain (unprofiled) steps
        "profiled_step_ms": float,   # mean of the profiler's step scopes
        "wall_ms": float,            # perf_counter around the profiled steps
        "breakdown": [{"phase": str, "row": str, "ms": float}],
        "operators": [{"phase": str, "row": str, "op": str, "ms": float, "calls": float}],
        "flops": {"model": int, "hardware": int, "counted": int | null,
                  "forward": {row: int}, "backward": {row: int}},
        "tokens_per_s": float, "mfu": float, "mfu_6n": float,
        "prediction": null | {"predicted_ms": float, "measured_ms": float, "ratio": float,
                              "error": float, "rows": [...], ...},
                              # matrix settings add "units" and "unit_costs"
                              # (moeflow.apps.bench.predict_matrix.compare_matrix)
        "ep": null | {"world_size": int, "r": int, "dispatch_ms": float, ...}
      }]
    }

Times are milliseconds per step; ``phase`` is ``forward``, ``backward`` or ``optimizer``;
``row`` one of :data:`moeflow.apps.bench.workloads.CATEGORIES`. A failed setting (for example a
``torch.compile`` that does not build) keeps its ``error`` and empty results.
"""

from __future__ import annotations

import json
from pathlib import Path

from moeflow.apps.bench.workloads import CATEGORIES
from moeflow.errors import InputError
from moeflow.files import atomic_file

FORMAT = "moeflow.bench/1"
PHASES = ("forward", "backward", "optimizer")

_TOP = {
    "format": str,
    "mode": str,
    "model": dict,
    "shape": dict,
    "machine": dict,
    "peak_flops": (int, float),
    "peak_source": str,
    "steps": dict,
    "nproc": int,
    "settings": list,
}
_SETTING = {"setting": dict, "status": str, "breakdown": list, "operators": list, "flops": dict}
_OK_NUMBERS = ("step_ms", "profiled_step_ms", "wall_ms", "tokens_per_s", "mfu", "mfu_6n")


def validate_report(d: dict) -> None:
    """Raise :class:`InputError` naming the first field that breaks ``moeflow.bench/1``."""

    def need(obj, key, typ, where):
        if key not in obj:
            raise InputError(f"bench report: {where}{key} is missing")
        types = typ if isinstance(typ, tuple) else (typ,)
        v = obj[key]
        if not isinstance(v, types) or (isinstance(v, bool) and bool not in types):
            raise InputError(f"bench report: {where}{key} has type {type(obj[key]).__name__}")

    if not isinstance(d, dict):
        raise InputError("bench report: not a JSON object")
    for k, t in _TOP.items():
        need(d, k, t, "")
    if d["format"] != FORMAT:
        raise InputError(f"bench report: format={d['format']!r}, expected {FORMAT!r}")
    if d["mode"] not in ("train", "decode"):
        raise InputError(f"bench report: mode={d['mode']!r}, expected 'train' or 'decode'")
    for i, s in enumerate(d["settings"]):
        where = f"settings[{i}]."
        for k, t in _SETTING.items():
            need(s, k, t, where)
        if s["status"] not in ("ok", "failed"):
            raise InputError(f"bench report: {where}status={s['status']!r}")
        for k in ("kernel", "dtype", "recompute", "compile", "label"):
            need(s["setting"], k, (str, bool), where + "setting.")
        if s["status"] != "ok":
            continue
        for k in _OK_NUMBERS:
            need(s, k, (int, float), where)
        for j, b in enumerate(s["breakdown"]):
            w = f"{where}breakdown[{j}]."
            if b.get("phase") not in PHASES or b.get("row") not in CATEGORIES:
                raise InputError(
                    f"bench report: {w}phase/row = {b.get('phase')!r}/"
                    f"{b.get('row')!r} not one of {PHASES} / {CATEGORIES}"
                )
            need(b, "ms", (int, float), w)
        for k in ("model", "hardware"):
            need(s["flops"], k, int, where + "flops.")


def write_json(report: dict, path: str | Path) -> None:
    validate_report(report)
    Path(path).write_text(json.dumps(report, indent=1) + "\n")


# ---------------------------------------------------------------------------------- table
def _fmt_ms(v: float) -> str:
    return f"{v:8.2f}"


def format_table(report: dict) -> str:
    """Rows x (forward, backward) per setting, then the per-setting summary."""
    lines = []
    m = report["model"]
    lines.append(
        f"moeflow bench {report['mode']}: {m['kind']} model, "
        f"{m['params_total'] / 1e6:.2f} M params ({m['params_active'] / 1e6:.2f} M "
        f"active), batch {report['shape']['batch']} x {report['shape']['seq_len']}, "
        f"{report['machine']['threads']} threads, nproc {report['nproc']}"
    )
    lines.append(f"peak {report['peak_flops'] / 1e9:.1f} GFLOP/s ({report['peak_source']})")
    ok = [s for s in report["settings"] if s["status"] == "ok"]
    for s in ok:
        lines.append("")
        lines.append(
            f"[{s['setting']['label']}]  step {s['step_ms']:.2f} ms  "
            f"(profiled {s['profiled_step_ms']:.2f} ms)  "
            f"{s['tokens_per_s']:,.0f} tok/s  MFU {100 * s['mfu']:.2f}%"
        )
        phases = [p for p in PHASES if any(b["phase"] == p for b in s["breakdown"])]
        lines.append(
            f"  {'row':<12}" + "".join(f"{p:>10}" for p in phases) + f"{'total':>10}{'share':>8}"
        )
        total = sum(b["ms"] for b in s["breakdown"]) or 1.0
        for row in CATEGORIES:
            vals = {b["phase"]: b["ms"] for b in s["breakdown"] if b["row"] == row}
            if not vals:
                continue
            t = sum(vals.values())
            lines.append(
                f"  {row:<12}"
                + "".join(f"{vals.get(p, 0.0):>10.2f}" for p in phases)
                + f"{t:>10.2f}{100 * t / total:>7.1f}%"
            )
        top = sorted(s["operators"], key=lambda o: -o["ms"])[:6]
        lines.append(
            "  top operators (self time): "
            + ", ".join(f"{o['op']} [{o['phase'][:3]}/{o['row']}] {o['ms']:.2f}" for o in top)
        )
        if s.get("prediction"):
            p = s["prediction"]
            lines.append(
                f"  simulator: predicted {p['predicted_ms']:.2f} ms vs measured "
                f"{p['measured_ms']:.2f} ms (ratio {p['ratio']:.3f})"
            )
        if s.get("ep"):
            e = s["ep"]
            lines.append(
                f"  EP world {e['world_size']} r={e['r']}: dispatch "
                f"{e['dispatch_ms']:.2f} ms, experts {e['experts_ms']:.2f} ms, combine "
                f"{e['combine_ms']:.2f} ms, comm {e['comm_ms']:.2f} ms of which hidden "
                f"{100 * e['hidden_fraction']:.0f}%"
            )
    failed = [s for s in report["settings"] if s["status"] != "ok"]
    lines.append("")
    lines.append(f"{'setting':<40}{'step ms':>10}{'vs first':>10}{'MFU %':>8}{'sim ratio':>11}")
    base = ok[0]["step_ms"] if ok else None
    for s in ok:
        sim = s.get("prediction") or {}
        lines.append(
            f"{s['setting']['label']:<40}{s['step_ms']:>10.2f}"
            f"{s['step_ms'] / base:>10.2f}{100 * s['mfu']:>8.2f}"
            f"{sim.get('ratio') or float('nan'):>11.3f}"
        )
    for s in failed:
        lines.append(f"{s['setting']['label']:<40}  failed: {s['error']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ PNG
def write_png(report: dict, path: str | Path) -> None:
    """Stacked bars: one bar per (setting, phase), stacked by row (module)."""
    from moeflow._deps import require

    matplotlib = require("matplotlib", "moeflow bench --png")
    matplotlib.use("Agg")
    plt = require("matplotlib.pyplot", "moeflow bench --png")
    ok = [s for s in report["settings"] if s["status"] == "ok"]
    phases = [p for p in PHASES if any(b["phase"] == p for s in ok for b in s["breakdown"])]
    rows = [r for r in CATEGORIES if any(b["row"] == r for s in ok for b in s["breakdown"])]
    cmap = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(ok) * (len(phases) + 1) + 2), 4.5))
    xs, labels = [], []
    width = 0.8
    for i, s in enumerate(ok):
        for j, p in enumerate(phases):
            x = i * (len(phases) + 1) + j
            xs.append(x)
            labels.append(f"{p[:3]}")
            bottom = 0.0
            for k, r in enumerate(rows):
                v = sum(b["ms"] for b in s["breakdown"] if b["phase"] == p and b["row"] == r)
                if v:
                    ax.bar(
                        x,
                        v,
                        width,
                        bottom=bottom,
                        color=cmap(k % 10),
                        label=r if (i == 0 and j == 0) or False else None,
                    )
                    bottom += v
    ax.set_xticks(xs)
    ax.set_xticklabels(labels, fontsize=7)
    for i, s in enumerate(ok):
        x = i * (len(phases) + 1) + (len(phases) - 1) / 2
        ax.text(
            x,
            -0.09,
            s["setting"]["label"],
            ha="center",
            va="top",
            fontsize=6,
            transform=ax.get_xaxis_transform(),
            rotation=12,
        )
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(k % 10)) for k in range(len(rows))]
    ax.legend(handles, rows, fontsize=7, loc="upper right")
    ax.set_ylabel("ms per step (profiled)")
    m = report["model"]
    ax.set_title(
        f"moeflow bench {report['mode']}: {m['kind']} model, batch "
        f"{report['shape']['batch']}x{report['shape']['seq_len']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------- trace
def with_rank_metadata(trace: dict, rank: int, world_size: int, backend: str) -> dict:
    """The profiler's Chrome trace with the ``distributedInfo`` block Holistic Trace Analysis
    reads to map a file to its rank (``{"backend", "rank", "world_size"}``)."""
    out = dict(trace)
    out["distributedInfo"] = {"backend": backend, "rank": int(rank), "world_size": int(world_size)}
    return out


def write_trace(
    trace: dict, directory: str | Path, rank: int, world_size: int, backend: str
) -> Path:
    """``<directory>/rank<rank>.json``: one file per rank, as HTA's ``trace_dir`` expects."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"rank{rank}.json"
    with atomic_file(path) as f:
        f.write(json.dumps(with_rank_metadata(trace, rank, world_size, backend)))
    return path


# ------------------------------------------------------------------------------- markdown
def format_markdown(report: dict) -> str:
    """One report as Markdown tables: settings summary, rows x phase of every setting, the
    baseline's top operators, and the simulator's per-row comparison (for records)."""
    out = []
    m, sh = report["model"], report["shape"]
    out.append(
        f"### `{report['mode']}`: {m['kind']} model, batch {sh['batch']} x "
        f"{sh['seq_len']}, {m['params_total'] / 1e6:.2f} M params "
        f"({m['params_active'] / 1e6:.2f} M active), nproc {report['nproc']}, "
        f"{report['machine']['threads']} threads"
    )
    out.append("")
    out.append(
        f"Peak for MFU: {report['peak_flops'] / 1e9:.1f} GFLOP/s "
        f"({report['peak_source']}); steps: {report['steps']['warmup']} warm-up, "
        f"{report['steps']['unprofiled']} plain (median = step), "
        f"{report['steps']['profiled']} profiled (mean = breakdown)."
    )
    out.append("")
    ok = [s for s in report["settings"] if s["status"] == "ok"]
    out.append(
        "| setting | step ms | vs first | profiled ms | tok/s | model GFLOP | counted "
        "GFLOP | MFU % | MFU(6N) % | sim ms | sim/measured |"
    )
    out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    base = ok[0]["step_ms"] if ok else 1.0
    for s in ok:
        f = s["flops"]
        p = s.get("prediction") or {}
        counted = "-" if f.get("counted") is None else f"{f['counted'] / 1e9:.3f}"
        sim = "-" if not p else f"{p['predicted_ms']:.2f}"
        ratio = "-" if not p or p.get("ratio") is None else f"{p['ratio']:.3f}"
        out.append(
            f"| {s['setting']['label']} | {s['step_ms']:.2f} | {s['step_ms'] / base:.2f} "
            f"| {s['profiled_step_ms']:.2f} | {s['tokens_per_s']:,.0f} | "
            f"{f['model'] / 1e9:.3f} | {counted} | {100 * s['mfu']:.2f} | "
            f"{100 * s['mfu_6n']:.2f} | {sim} | {ratio} |"
        )
    for s in report["settings"]:
        if s["status"] != "ok":
            out.append(f"| {s['setting']['label']} | failed: {s['error']} |||||||||| ")
    out.append("")
    phases = [p for p in PHASES if any(b["phase"] == p for s in ok for b in s["breakdown"])]
    rows = [r for r in CATEGORIES if any(b["row"] == r for s in ok for b in s["breakdown"])]
    out.append("Breakdown, ms per step (profiled), " + " / ".join(phases) + ":")
    out.append("")
    out.append("| row | " + " | ".join(s["setting"]["label"] for s in ok) + " |")
    out.append("|---|" + "---:|" * len(ok))
    for r in rows:
        cells = []
        for s in ok:
            vals = [
                sum(b["ms"] for b in s["breakdown"] if b["row"] == r and b["phase"] == p)
                for p in phases
            ]
            cells.append(" / ".join(f"{v:.2f}" for v in vals))
        out.append(f"| {r} | " + " | ".join(cells) + " |")
    if ok:
        s = ok[0]
        out.append("")
        out.append(f"Top operators of `{s['setting']['label']}` (self time, ms per step):")
        out.append("")
        out.append("| operator | phase | row | ms | calls |")
        out.append("|---|---|---|---:|---:|")
        for o in sorted(s["operators"], key=lambda o: -o["ms"])[:12]:
            out.append(
                f"| `{o['op']}` | {o['phase']} | {o['row']} | {o['ms']:.3f} | {o['calls']:.0f} |"
            )
        if s.get("prediction"):
            p = s["prediction"]
            out.append("")
            out.append(
                f"Simulator vs measured, `{s['setting']['label']}` (measured rows: "
                "profiled, scaled to the plain step):"
            )
            out.append("")
            out.append("| phase | row | measured ms | predicted ms | predicted/measured |")
            out.append("|---|---|---:|---:|---:|")
            for r in p["rows"]:
                ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
                out.append(
                    f"| {r['phase']} | {r['row']} | {r['measured_ms']:.3f} | "
                    f"{r['predicted_ms']:.3f} | {ratio} |"
                )
            out.append(
                f"| **total** | | {p['measured_ms']:.3f} | {p['predicted_ms']:.3f} | "
                f"{p['ratio']:.3f} |"
            )
    eps = [s for s in ok if s.get("ep")]
    if eps:
        out.append("")
        out.append("Expert parallelism (rank means; waits = exposed communication):")
        out.append("")
        out.append(
            "| setting | phase | dispatch wait ms | combine wait ms | experts ms | "
            "a2a alone ms | hidden |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|")
        for s in eps:
            for ph, v in s["ep"]["phases"].items():
                hid = "-" if v["hidden_fraction"] is None else f"{100 * v['hidden_fraction']:.0f}%"
                out.append(
                    f"| {s['setting']['label']} r={s['ep']['r']} | {ph} | "
                    f"{v['dispatch_wait_ms']:.2f} | {v['combine_wait_ms']:.2f} | "
                    f"{v['experts_ms']:.2f} | {v['comm_ms']:.2f} | {hid} |"
                )
    return "\n".join(out) + "\n"
