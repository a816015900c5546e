"""``moeflow serve --ag 1 --eg M`` over HTTP under Poisson load: FinDEP per step vs naive DEP
vs tuned PPPipe, on loopback and across tc-shaped links.

    python benchmarks/serve_disagg_http_cpu.py [--repeat 5] [--layouts 1x1,1x2]
        [--links loopback,1gbit,100mbit] [--shaped-repeat N] [--rates 8,32] [--requests 16]
        [--input-len 32[,384]] [--output-len 32[,16]] [--refit-every K]
        [--out benchmarks/results]

One random-weight Qwen3-MoE checkpoint (that of ``serve_http_cpu.py``: hidden 256, 4 layers,
8 experts top-2, no shared expert, a 64-token character tokenizer, float32) is served by
``moeflow serve DIR --ag 1 --eg M --schedule S`` for each schedule S:

* ``findep``: ``(r1, r2, order)`` solved at every forward step for that step's shape by
  FinDEP's step solver, from costs the ranks measure at start (this host, this link);
* ``pppipe``: the same solver's best ``r1`` per step (``r2 = 1``, ASAS);
* ``naive``: ``r1 = r2 = 1``.

``moeflow load`` (:mod:`moeflow.apps.loadgen`, vLLM's ``benchmark_serving`` metrics) drives
each server at every rate with the same seeded requests (random token-id prompts of
``--input-len``, exactly ``--output-len`` output tokens via ``ignore_eos``; comma lists give
several workloads, each its own cells) and reports
throughput, TTFT, TPOT, ITL and goodput under one SLO for every schedule (``--slo-ttft-ms``,
``--slo-tpot-ms``). A repeat runs every schedule once, in a fresh random order: a fresh server
(which measures its costs), the same 4-request warm-up, the rates in a shuffled order, then
``/health``'s step log (every step shape, its plan, count, measured and predicted ms, the
prediction under the costs in use: the server refits them to its served steps every
``--refit-every`` steps) and the server is stopped. The record gives every run, and per
schedule the median and the range.

Links: ``loopback``: the ranks on 127.0.0.1. A tc rate (``1gbit``, ``100mbit``): every rank
in its own network namespace of an emulated cluster (``emulated_cluster.py``: one node per
rank, every node's link shaped to the rate both ways; needs root, iproute2 and tc, else the
cells are recorded as skipped with the reason; ``MOEFLOW_EMU_PREFIX`` names the namespaces).
The HTTP process and the load generator stay on the host's loopback; each forked rank enters
its node's namespace before it joins the gloo group (``DisaggregatedEngine(rank_init=...)``),
so the a2e and e2a transfers, and the server's link measurement, cross the shaped links.
Everything else is ``moeflow serve``'s own command line (``moeflow.cli.serve.run``).

Writes ``serve_disagg_http_cpu_<host>_<date>.md`` and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name, free_port, stop_server, wait_for_server  # noqa: E402

SCHEDULES = ("naive", "pppipe", "findep")
MODEL = "qwen3moe-tiny"


# ---- the server side of a shaped-link run ----------------------------------------------------
def _enter_node(rank: int) -> None:
    """Move this (forked, single-threaded) rank into node ``rank``'s network namespace."""
    import ctypes

    import emulated_cluster as ec

    fd = os.open(f"/run/netns/{ec.PREFIX}{rank}", os.O_RDONLY)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ec.PREFIX}{rank}: {os.strerror(err)}")
    finally:
        os.close(fd)
    os.environ["GLOO_SOCKET_IFNAME"] = ec.IFACE


def serve_shaped(serve_argv: list[str]) -> int:
    """``moeflow serve`` with every rank in its own emulated node (the cluster is up)."""
    import emulated_cluster as ec

    from moeflow.cli import serve as cli_serve

    p = argparse.ArgumentParser()
    cli_serve.add_arguments(p)
    args = p.parse_args(serve_argv)
    return cli_serve.run(args, {"rank_init": _enter_node, "master_addr": ec.addr(0)})


# ---- the driver ----------------------------------------------------------------------------
def start(
    ckpt: str, eg: int, schedule: str, shaped: bool, log, refit_every: int | None = None
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    serve = [ckpt, "--port", str(port), "--ag", "1", "--eg", str(eg), "--schedule", schedule]
    if refit_every is not None and schedule != "naive":
        serve += ["--refit-every", str(refit_every)]
    serve += ["--log-level", "warning", "--force-nproc", "--timeout-s", "120"]
    if shaped:
        cmd = [sys.executable, os.path.abspath(__file__), "--serve-shaped", "--", *serve]
    else:
        cmd = [sys.executable, "-m", "moeflow.cli", "serve", *serve]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_server(proc, url + "/health", schedule, 300)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    stop_server(proc, 60)


def _health(url: str) -> dict:
    import httpx

    time.sleep(0.75)  # rank 0 reports its step log every 0.25 s once it changed
    return httpx.get(url + "/health", timeout=5).json()


def cell(
    args, ckpt: str, eg: int, link: str, io: tuple[int, int], rng: random.Random, tmp: str
) -> dict:
    """Every run of one layout, link and workload (``io``: prompt and output tokens)."""
    from moeflow.apps.loadgen import LoadConfig, run_load

    shaped = link != "loopback"
    rates = [float(r) for r in args.rates.split(",")]
    base = dict(
        model=MODEL,
        input_len=io[0],
        output_len=io[1],
        vocab_size=64,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
    )
    runs, order = [], []
    repeat = args.repeat if not shaped or args.shaped_repeat is None else args.shaped_repeat
    for rep in range(repeat):
        todo = rng.sample(SCHEDULES, len(SCHEDULES))
        order.append(todo)
        for s in todo:
            with open(os.path.join(tmp, f"{s}.log"), "ab") as log:
                t0 = time.monotonic()
                proc, url = start(ckpt, eg, s, shaped, log, args.refit_every)
                start_s = time.monotonic() - t0
                try:
                    warm = run_load(LoadConfig(url=url, **base, requests=4, seed=999))
                    if warm["completed"] != 4:
                        raise RuntimeError(f"{s} warm-up failed: {warm['errors']}")
                    before = _health(url)  # after the warm-up
                    for rate in rng.sample(rates, len(rates)):
                        r = run_load(LoadConfig(url=url, **base, rate=rate, requests=args.requests))
                        r.pop("requests")
                        after = _health(url)
                        runs.append(
                            {
                                "repeat": rep,
                                "schedule": s,
                                "rate": rate,
                                "start_s": start_s,
                                "report": r,
                                "steps": _step_delta(before, after),
                                "costs": after.get("start_costs", after["costs"]),
                                "refit": {
                                    "costs": after.get("costs"),
                                    "serial": after.get("serial"),
                                    "refits": after.get("refits"),
                                    "last": (after.get("planners") or [{}])[0].get("last_refit"),
                                },
                            }
                        )
                        before = after
                        print(
                            f"  rep {rep} {s:>6} rate {rate:g}: goodput {r['goodput']:.3f} "
                            f"req/s, {r['output_throughput']:.1f} tok/s, TTFT p50 "
                            f"{r['ttft_ms']['p50']:.0f} ms, TPOT p50 {r['tpot_ms']['p50']:.1f} ms,"
                            f" done {r['completed']}/{args.requests}",
                            flush=True,
                        )
                finally:
                    stop(proc)
    return {"order": order, "runs": runs}


def _step_delta(before: dict, after: dict) -> list[dict]:
    """The steps of one load: ``/health``'s step log after it less the log before it."""
    old = {_key(p): p for p in before["plans"]}
    out = []
    for p in after["plans"]:
        q = old.get(_key(p))
        n = p["steps"] - (q["steps"] if q else 0)
        if n > 0:
            out.append({**p, "steps": n, "ms": p["ms"] - (q["ms"] if q else 0.0)})
    return out


def _key(p: dict) -> tuple:
    return (p["rank"], p["seqs"], p["tokens"], p["r1"], p["r2"], p["order"])


def _med(xs) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{statistics.median(xs):.3g} [{min(xs):.3g}-{max(xs):.3g}]"


def summarize(rec: dict, rates: list[float]) -> tuple[list[str], dict]:
    """Per rate and schedule: the median [min-max] of every metric; FinDEP's goodput over the
    best other schedule's (medians)."""
    lines = [
        "| rate req/s | schedule | n | goodput req/s | output tok/s | TTFT p50 ms | TTFT p99 ms "
        "| TPOT p50 ms | ITL p50 ms | prefill step ms | decode step ms "
        "| steps split (r1 or r2 > 1) | step meas/pred |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    ratios = {}
    for rate in rates:
        med = {}
        for s in SCHEDULES:
            rs = [x for x in rec["runs"] if x["schedule"] == s and x["rate"] == rate]
            reps = [x["report"] for x in rs]
            if not reps:
                continue
            med[s] = statistics.median(r["goodput"] for r in reps)
            splits, ratio, pre_ms, dec_ms = [], [], [], []
            for x in rs:
                st = x.get("steps") or []
                for out, pick in ((pre_ms, lambda t: t > 1), (dec_ms, lambda t: t == 1)):
                    k = sum(p["steps"] for p in st if pick(p["tokens"]))
                    out.append(sum(p["ms"] for p in st if pick(p["tokens"])) / k if k else None)
                n = sum(p["steps"] for p in st)
                split = sum(p["steps"] for p in st if p["r1"] > 1 or p["r2"] > 1)
                splits.append(split / n if n else None)
                pred = sum(p["steps"] * p["predicted_ms"] for p in st if p["predicted_ms"])
                meas = sum(p["ms"] for p in st if p["predicted_ms"])
                ratio.append(meas / pred if pred else None)
            lines.append(
                f"| {rate:g} | {s} | {len(reps)} | {_med(r['goodput'] for r in reps)} | "
                f"{_med(r['output_throughput'] for r in reps)} | "
                f"{_med(r['ttft_ms']['p50'] for r in reps)} | "
                f"{_med(r['ttft_ms']['p99'] for r in reps)} | "
                f"{_med(r['tpot_ms']['p50'] for r in reps)} | "
                f"{_med(r['itl_ms']['p50'] for r in reps)} | "
                f"{_med(pre_ms)} | {_med(dec_ms)} | {_med(splits)} | {_med(ratio)} |"
            )
        others = [v for k, v in med.items() if k != "findep"]
        if "findep" in med and others and max(others) > 0:
            ratios[f"{rate:g}"] = med["findep"] / max(others)
    return lines, ratios


def _ratio(r: float | None, findep: float | None) -> str:
    """FinDEP's goodput over the best other's; where every other schedule met the SLO in no
    request, FinDEP's own goodput (the ratio is unbounded)."""
    if r is not None:
        return f"{r:.2f}x"
    if findep:
        return f"unbounded (FinDEP {findep:.2f} req/s, every other 0)"
    return "-"


def every_run(rec: dict) -> list[str]:
    lines = [
        "| repeat | schedule | rate | start s | goodput req/s | tok/s | TTFT p50 ms | TPOT p50 ms "
        "| done | steps | plans used (r1/r2/order: steps) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in rec["runs"]:
        r = x["report"]
        st = x.get("steps") or []
        plans: dict = {}
        for p in st:
            k = f"{p['r1']}/{p['r2']}/{p['order']}"
            plans[k] = plans.get(k, 0) + p["steps"]
        lines.append(
            f"| {x['repeat'] + 1} | {x['schedule']} | {x['rate']:g} | {x['start_s']:.1f} | "
            f"{r['goodput']:.3f} | {r['output_throughput']:.1f} | {r['ttft_ms']['p50']:.0f} | "
            f"{r['tpot_ms']['p50']:.1f} | {r['completed']} | {sum(p['steps'] for p in st)} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(plans.items(), key=lambda kv: -kv[1]))
            + " |"
        )
    return lines


def _flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    return ", ".join(f for f in ("avx512_bf16", "avx2") if f in out.split())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument(
        "--shaped-repeat", type=int, default=None, help="repeats on shaped links (--repeat)"
    )
    ap.add_argument("--layouts", default="1x1,1x2", help="AGxEG, comma-separated (AG = 1)")
    ap.add_argument("--links", default="loopback,1gbit,100mbit", help="loopback or tc rates")
    ap.add_argument(
        "--rates", default="8,32", help="Poisson request rates (req/s), comma-separated"
    )
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument(
        "--input-len", default="32", help="prompt tokens; a comma list: one workload each"
    )
    ap.add_argument(
        "--output-len", default="32", help="output tokens, one per --input-len workload"
    )
    ap.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    ap.add_argument("--slo-tpot-ms", type=float, default=100.0)
    ap.add_argument(
        "--burst",
        default="256kb",
        help="tc token bucket of each shaped link (emulated_cluster.up's default)",
    )
    ap.add_argument("--seed", type=int, default=0, help="order of schedules and rates")
    ap.add_argument(
        "--refit-every",
        type=int,
        default=None,
        help="the servers' --refit-every (default: moeflow serve's)",
    )
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--serve-shaped", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_shaped:
        return serve_shaped(args.rest[1:] if args.rest[:1] == ["--"] else args.rest)
    import emulated_cluster as ec
    import torch
    from serve_http_cpu import make_checkpoint

    rng = random.Random(args.seed)
    rates = [float(r) for r in args.rates.split(",")]
    ins = [int(v) for v in args.input_len.split(",")]
    outs = [int(v) for v in args.output_len.split(",")]
    if len(ins) != len(outs):
        raise SystemExit("--input-len and --output-len: one output length per prompt length")
    workloads = list(zip(ins, outs))
    tmp = tempfile.mkdtemp(prefix="serve_disagg_http_")
    ckpt = os.path.join(tmp, MODEL)
    os.makedirs(ckpt)
    make_checkpoint(ckpt)
    records: dict = {}
    t_start = time.time()
    try:
        for layout in [x for x in args.layouts.split(",") if x]:
            ag, eg = (int(v) for v in layout.split("x"))
            if ag != 1:
                raise SystemExit(f"--layouts {layout}: this benchmark runs AG = 1")
            for link in [x for x in args.links.split(",") if x]:
                keys = {
                    io: f"AG1xEG{eg} {link}" + (f" {io[0]}/{io[1]}" if len(workloads) > 1 else "")
                    for io in workloads
                }
                print(f"serve_disagg_http_cpu: AG1xEG{eg} {link} ...", flush=True)
                if link != "loopback":
                    why = ec.unavailable() or (
                        f"namespaces with prefix {ec.PREFIX} are already up; not touched"
                        if ec.namespaces()
                        else None
                    )
                    if why:
                        records.update({key: {"skipped": why} for key in keys.values()})
                        continue
                    ec.up(1 + eg, link, burst=args.burst)
                try:
                    for io, key in keys.items():
                        try:
                            records[key] = cell(args, ckpt, eg, link, io, rng, tmp)
                        except RuntimeError as e:
                            records[key] = {"skipped": f"failed: {e}"}
                            print(f"  {e}", flush=True)
                finally:
                    if link != "loopback":
                        ec.down()
                # the record so far, after every cell
                write(args, rates, records, (time.time() - t_start) / 60, torch.__version__)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def write(args, rates, records, minutes: float, torch_version: str) -> None:
    import importlib.metadata as md

    date = datetime.date.today().isoformat()
    stem = f"serve_disagg_http_cpu_{args.host}_{date}"
    cmd = "python benchmarks/serve_disagg_http_cpu.py " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if k not in ("out", "host", "serve_shaped", "rest") and v is not None
    )
    versions = {
        "python": platform.python_version(),
        "torch": torch_version,
        "transformers": md.version("transformers"),
        "fastapi": md.version("fastapi"),
        "uvicorn": md.version("uvicorn"),
        "httpx": md.version("httpx"),
    }
    summary_rows = [
        "| layout | link | FinDEP / best other, goodput (medians) | best other |",
        "| --- | --- | --- | --- |",
    ]
    sections = []
    for key, rec in records.items():
        layout, link = key.split(" ", 1)
        if "skipped" in rec:
            summary_rows.append(f"| {layout} | {link} | skipped: {rec['skipped']} | |")
            sections += [f"## {key}", "", f"skipped: {rec['skipped']}", ""]
            continue
        table, ratios = summarize(rec, rates)
        rec["findep_over_best_goodput"] = ratios
        for rate in rates:
            r = ratios.get(f"{rate:g}")
            meds = {
                s: statistics.median(
                    x["report"]["goodput"]
                    for x in rec["runs"]
                    if x["schedule"] == s and x["rate"] == rate
                )
                for s in SCHEDULES
                if any(x["schedule"] == s and x["rate"] == rate for x in rec["runs"])
            }
            best = max((s for s in meds if s != "findep"), key=meds.get, default="-")
            summary_rows.append(
                f"| {layout} | {link} (rate {rate:g}) | {_ratio(r, meds.get('findep'))} | {best} |"
            )
        costs = [x["costs"] for x in rec["runs"] if x["costs"] and x["rate"] == rates[0]]
        cost_lines = []
        for i, c in enumerate(costs):
            cost_lines.append(
                f"- server {i + 1}: "
                + ", ".join(
                    f"{k} {v['alpha_ms']:.3g} + {v['beta_ms']:.3g}/{v['unit']}"
                    for k, v in c.items()
                )
            )
        sections += [
            f"## {key}",
            "",
            "Round order: " + "; ".join(" ".join(o) for o in rec["order"]),
            "",
            "Median [min-max] over the repeats; prefill / decode step ms: the mean wall time of "
            "the attention rank's forward steps with new prompt tokens / with one token per "
            "sequence; steps split: the share of the timed steps run with r1 > 1 or r2 > 1; "
            "step meas/pred: measured over the solver's predicted time of those steps (findep "
            "and pppipe).",
            "",
            *table,
            "",
            "Every run, in the order run:",
            "",
            *every_run(rec),
            "",
            "Costs each solved server measured at start (alpha ms + beta ms per unit):",
            "",
            *cost_lines,
            "",
        ]
    lines = [
        f"# moeflow serve --ag 1 --eg M over HTTP: FinDEP per step vs naive DEP vs tuned PPPipe "
        f"({date}, {args.host})",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPUs, lscpu flags: {_flags()}",
        "- software: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- command: `{cmd}` (as root for the shaped links, with `MOEFLOW_EMU_PREFIX` naming "
        "the namespaces)",
        f"- workload: random-weight Qwen3-MoE (hidden 256, 4 layers, 8 experts top-2, float32), "
        f"`moeflow load` with {args.requests} requests per run at Poisson rate(s) {args.rates} "
        f"req/s; prompt / output tokens (ignore_eos) per workload: "
        + ", ".join(
            f"{i}/{o}" for i, o in zip(args.input_len.split(","), args.output_len.split(","))
        )
        + "; "
        f"goodput SLO TTFT <= {args.slo_ttft_ms:g} ms and TPOT <= {args.slo_tpot_ms:g} ms; "
        f"one torch thread per rank; {args.repeat} repeats on loopback, "
        f"{args.shaped_repeat or args.repeat} on shaped links, schedules in a fresh random "
        f"order each; {minutes:.0f} minutes in all",
        "",
        "## Summary",
        "",
        *summary_rows,
        "",
        *sections,
    ]
    os.makedirs(args.out, exist_ok=True)
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_flags": _flags(),
        "command": cmd,
        "versions": versions,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "rest")},
        "records": records,
    }
    with open(os.path.join(args.out, stem + ".json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:20]))


if __name__ == "__main__":
    sys.exit(main())
