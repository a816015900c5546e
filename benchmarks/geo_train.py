"""Geo-distributed pipeline training (FusionLLM) on emulated sites: our partition against an
even layer split and against plain data parallel, and AdaTopK's convergence.

World 4 = two "sites" of two nodes (network namespaces, ``emulated_cluster.up_sites``), 1 Gbit/s
inside a site and 10-100 Mbit/s between the sites (HTB per pair of nodes: the kernel paces the
bytes, so a slow link costs wall time, not CPU). Every rank is one ``torchrun`` node in its
namespace; the store of torchrun's agent on the first stage's node is the broker.

* **ours**: ``moeflow.plan.geo.partition`` of the traced demo model over the 4 devices (exact
  links), and **ours + AdaTopK** (the planner sparsifies the links it finds slow);
* **even**: the same pipeline runtime with ``even_split`` (equal numbers of layers per device,
  devices in file order);
* **DP**: ``torch.nn.parallel.DistributedDataParallel`` over the 4 nodes (gloo), the same
  global batch, one micro-batch per rank.

Convergence runs on local ranks (loopback): the numbers a link carries do not depend on its
speed, so the 10 Mbit/s plan's AdaTopK densities give the same curve on any link. Needs root
for the emulated part (skipped with the reason otherwise).

    python benchmarks/geo_train.py                      # record in benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_name, write_record  # noqa: E402

MODEL = dict(dim=128, layers=4, heads=4, seq_len=64, experts=4, microbatch_size=4)
MICROBATCHES = 4
RANKS_PER_CORE = 2  # 4 ranks on 2 cores: each rank gets about half a core


def job(**kw):
    from moeflow.geo.pipeline import GeoJob

    base = dict(MODEL, microbatches=MICROBATCHES, steps=8, timeout_s=1800.0)
    base.update(kw)
    return GeoJob(**base)


def device_rate(traced, module) -> float:
    """Sustained training FLOP/s of one rank on this machine (one thread, shared cores)."""
    import torch

    torch.set_num_threads(1)
    x = torch.randint(0, 256, (MODEL["microbatch_size"], MODEL["seq_len"]))
    for _ in range(2):
        module(x, x).backward()
    t = time.perf_counter()
    reps = 3
    for _ in range(reps):
        module(x, x).backward()
    dt = (time.perf_counter() - t) / reps
    flops = 3 * sum(n.flops for n in traced.ops.nodes)
    return flops / dt / RANKS_PER_CORE


def devices_doc(rate: str, flops: float) -> dict:
    import emulated_cluster as ec

    mbps = ec.rate_bits(rate) / 1e6
    return {
        "devices": [
            {"name": n, "flops": flops, "memory_gb": 4, "site": n[0]}
            for n in ("a0", "a1", "b0", "b1")
        ],
        "sites": {
            "a": {"bandwidth_mbps": 1000, "latency_ms": 0.1},
            "b": {"bandwidth_mbps": 1000, "latency_ms": 0.1},
        },
        "site_links": [{"a": "a", "b": "b", "bandwidth_mbps": mbps, "latency_ms": 1}],
    }


# ---- the DP baseline, one rank (run by torchrun inside a namespace) -------------------------
def dp_worker(steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moeflow.geo.pipeline import Batches, build_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
    rank, world = dist.get_rank(), dist.get_world_size()
    j = job(steps=steps)
    model = DDP(build_module(j))
    opt = torch.optim.AdamW(model.parameters(), lr=j.lr)
    batches = Batches(j)
    times, losses = [], []
    for step in range(steps):
        dist.barrier()
        t = time.perf_counter()
        mine = batches(step)[rank::world]
        total = 0.0
        for i, (idx, tgt) in enumerate(mine):
            loss = model(idx, tgt) * (world / j.microbatches)
            if i < len(mine) - 1:
                with model.no_sync():
                    loss.backward()
            else:
                loss.backward()
            total += loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(total)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"step_times_s": times, "losses": losses}, f)
    dist.barrier()
    dist.destroy_process_group()


# ---- emulated runs ---------------------------------------------------------------------------
def torchrun_on(ec, node_of_rank: list[int], cmd: list[str], port: int) -> list[int]:
    """Run ``cmd`` as a torchrun job, rank r in namespace ``node_of_rank[r]``."""
    n = len(node_of_rank)
    procs = []
    for r, node in enumerate(node_of_rank):
        tr = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(n),
            "--node-rank",
            str(r),
            "--nproc-per-node",
            "1",
            "--master-addr",
            ec.addr(node_of_rank[0]),
            "--master-port",
            str(port),
        ]
        procs.append(
            subprocess.Popen(
                ec.node_command(node, tr + cmd, env={"OMP_NUM_THREADS": "1"}),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    codes = []
    for p in procs:
        _, err = p.communicate(timeout=3600)
        codes.append(p.returncode)
        if p.returncode:
            sys.stderr.write(err[-3000:])
    return codes


def steady(times: list[float]) -> float:
    return statistics.median(times[1:])


def emulated(rate: str, plans: dict, steps: int, tmp: str) -> dict:
    import emulated_cluster as ec

    ec.up_sites([2, 2], "1gbit", rate)
    out = {}
    try:
        port = 29850
        for name, (plan, dens) in plans.items():
            path = os.path.join(tmp, f"{name}.json")
            plan_file = os.path.join(tmp, f"{name}_plan.json")
            with open(plan_file, "w") as f:
                doc = {"plan": {"bounds": list(plan.bounds), "densities": list(dens)}}
                json.dump(doc, f)
            cmd = ["-m", "moeflow.cli.geo", "train", "--plan", plan_file]
            cmd += ["--steps", str(steps), "--json", path, "--microbatches", str(MICROBATCHES)]
            cmd += [f"--{k.replace('_', '-')}={v}" for k, v in MODEL.items()]
            port += 1
            codes = torchrun_on(ec, list(plan.devices), cmd, port)
            if any(codes):
                out[name] = {"error": f"exit codes {codes}"}
                continue
            with open(path) as f:
                res = json.load(f)
            out[name] = {
                "step_s": steady(res["step_times_s"]),
                "losses": res["losses"],
                "wire_bytes": res["wire_bytes"],
                "bounds": list(plan.bounds),
                "devices": list(plan.devices),
                "densities": list(dens),
                "predicted_step_s": plan.step_time_s,
            }
        path = os.path.join(tmp, "dp.json")
        port += 1
        me = [os.path.abspath(__file__), "--dp-worker", "--steps", str(steps), "--json", path]
        codes = torchrun_on(ec, [0, 1, 2, 3], me, port)
        if any(codes):
            out["dp"] = {"error": f"exit codes {codes}"}
        else:
            with open(path) as f:
                res = json.load(f)
            out["dp"] = {"step_s": steady(res["step_times_s"]), "losses": res["losses"]}
    finally:
        ec.down()
    return out


def convergence(plan, dens, steps: int) -> dict:
    from moeflow.geo import pipeline as geo

    exact = geo.train(job(bounds=plan.bounds, steps=steps, threads=1), progress=False)
    sparse = geo.train(
        job(bounds=plan.bounds, densities=dens, steps=steps, threads=1), progress=False
    )
    tail = 20

    def end(losses):
        return statistics.mean(losses[-tail:])

    return {
        "steps": steps,
        "densities": list(dens),
        "exact_final": end(exact.losses),
        "adatopk_final": end(sparse.losses),
        "rel_diff": end(sparse.losses) / end(exact.losses) - 1,
        "exact_wire_bytes": exact.wire_bytes,
        "adatopk_wire_bytes": sparse.wire_bytes,
        "exact_losses": exact.losses,
        "adatopk_losses": sparse.losses,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="100mbit,10mbit")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--converge-steps", type=int, default=300)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    ap.add_argument("--dp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dp_worker:
        dp_worker(args.steps, args.json)
        return 0
    import emulated_cluster as ec
    import torch

    from moeflow.cli.geo import MIN_DENSITY
    from moeflow.geo.pipeline import trace_job
    from moeflow.plan import geo as pgeo

    module, traced = trace_job(job())
    flops = device_rate(traced, module)
    date = datetime.date.today().isoformat()
    info = {
        "date": date,
        "host": args.host,
        "machine": cpu_name(),
        "model": MODEL,
        "microbatches": MICROBATCHES,
        "device_flops": flops,
        "rates": {},
    }
    lines = [
        f"# Geo pipeline training on emulated sites ({date}, {args.host})",
        "",
        f"Command: `python benchmarks/geo_train.py --rates {args.rates} --steps {args.steps}"
        f" --converge-steps {args.converge_steps}`; CPU: {cpu_name()}; Python "
        f"{platform.python_version()}, torch {torch.__version__}. Demo MoE model {MODEL}, "
        f"{MICROBATCHES} micro-batches per step (GPipe), fp32, AdamW, one thread per rank. "
        "World 4 = 2 sites x 2 network namespaces, 1 Gbit/s inside a site, the stated rate "
        "between sites (HTB per pair). Step time: median of the steps after the first. "
        f"Device rate for the planner: {flops / 1e9:.2f} GFLOP/s per rank (measured, "
        f"halved for {RANKS_PER_CORE} ranks per core). AdaTopK plans use densities of at "
        f"least {MIN_DENSITY} (`moeflow geo plan --min-density`); activations go as plain "
        "top-k, their gradients at the positions sent (values only).",
        "",
    ]
    reason = ec.unavailable()
    tmp = tempfile.mkdtemp(prefix="geo_train_")
    conv_plan = None
    for rate in args.rates.split(","):
        dev_path = os.path.join(tmp, f"devices_{rate}.json")
        with open(dev_path, "w") as f:
            json.dump(devices_doc(rate, flops), f)
        graph = pgeo.DeviceGraph.load(dev_path)
        ours = pgeo.partition(traced.ops, graph, microbatches=MICROBATCHES)
        topk = pgeo.partition(
            traced.ops, graph, microbatches=MICROBATCHES, adatopk=True, min_density=MIN_DENSITY
        )
        even = pgeo.even_split(traced.ops, graph, microbatches=MICROBATCHES)
        dp = pgeo.data_parallel_step_s(traced.ops, graph, microbatches=MICROBATCHES)
        if rate == args.rates.split(",")[-1]:
            # convergence across the slow cut: the even split crosses the sites once; that
            # link carries AdaTopK at the lowest density plans use, the others stay exact
            sites = [graph.devices[d].site for d in even.devices]
            conv_dens = tuple(
                MIN_DENSITY if sites[i] != sites[i + 1] else 1.0 for i in range(len(sites) - 1)
            )
            conv_plan = even
        plans = {
            "ours": (ours, ours.densities),
            "ours_adatopk": (topk, topk.densities),
            "even": (even, even.densities),
        }
        cell = {
            "predicted_s": {
                "ours": ours.step_time_s,
                "ours_adatopk": topk.step_time_s,
                "even": even.step_time_s,
                "dp": dp,
            }
        }
        if reason:
            cell["measured"] = {"skipped": reason}
        else:
            cell["measured"] = emulated(rate, plans, args.steps, tmp)
        info["rates"][rate] = cell
        lines += [f"## {rate} between the sites", ""]
        lines += ["| schedule | stages (bounds) | densities | predicted ms | measured ms |"]
        lines += ["| --- | --- | --- | ---: | ---: |"]
        meas = cell["measured"]
        for name in ("ours", "ours_adatopk", "even", "dp"):
            m = meas.get(name, {}) if isinstance(meas, dict) else {}
            got = f"{m['step_s'] * 1e3:.0f}" if "step_s" in m else m.get("error", "skipped")
            if name == "dp":
                lines.append(f"| DP (DDP) | - | - | {dp * 1e3:.0f} | {got} |")
                continue
            p = plans[name][0]
            d = ", ".join(f"{x:.3g}" for x in p.densities)
            lines.append(f"| {name} | {list(p.bounds)} | {d} | {p.step_time_s * 1e3:.0f} | {got} |")
        if "ours" in meas and "step_s" in meas.get("ours", {}):
            best = min(meas[k]["step_s"] for k in ("ours", "ours_adatopk") if "step_s" in meas[k])
            ratios = {
                k: meas[k]["step_s"] / best for k in ("even", "dp") if "step_s" in meas.get(k, {})
            }
            cell["speedup_of_best_ours"] = ratios
            lines += [
                "",
                "Best of ours: "
                + ", ".join(f"{v:.2f}x faster than {k}" for k, v in ratios.items())
                + ".",
            ]
        lines.append("")
    if args.converge_steps:
        c = convergence(conv_plan, conv_dens, args.converge_steps)
        info["convergence"] = c
        lines += [
            f"## AdaTopK convergence ({args.converge_steps} steps, even split "
            f"{list(conv_plan.bounds)}, the {args.rates.split(',')[-1]} cut between the sites "
            f"sparsified: densities {[round(x, 3) for x in c['densities']]})",
            "",
            f"Mean loss of the last 20 steps: exact {c['exact_final']:.4f}, AdaTopK "
            f"{c['adatopk_final']:.4f} ({c['rel_diff'] * 100:+.2f}%; target within 2%). "
            f"Bytes on the links: exact {[round(b / 1e6, 1) for b in c['exact_wire_bytes']]} MB,"
            f" AdaTopK {[round(b / 1e6, 1) for b in c['adatopk_wire_bytes']]} MB.",
            "",
        ]
    write_record(args.out, f"geo_train_{args.host}_{date}", info, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
