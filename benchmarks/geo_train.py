"""Training across two emulated sites: wall time to a target loss of moeflow's geo modes
against DiLoCo and DDP, each arm on the same four devices.

Cluster: 2 sites x 2 nodes (network namespaces, ``emulated_cluster.up_sites([2, 2], ...)``),
1 Gbit/s inside a site, 100 or 10 Mbit/s between the sites (HTB per pair of nodes: the kernel
paces the bytes, so a slow link costs wall time, not CPU). Each node is one device: one rank,
one torch thread, in a CPU cgroup whose CFS quota is half a core (``--core-share``), so every
arm runs the same processes on the same compute whatever the others do (4 devices x 0.5 core =
the machine's 2 cores). Every rank is a ``torchrun`` node in its namespace.

Arms (each runs once per rate, in an order shuffled per rate; every run is reported):

* **pipeline**: ``moeflow.plan.geo.partition`` of the traced demo model over the 4 devices
  (exact links, memory for the whole model on any device); ``geo train --plan``.
* **pipeline_adatopk**: the setting where memory forces the pipeline across the slow link:
  each device holds ``--memory-fraction`` of what the whole model needs (weights, gradients,
  Adam moments, activations), so a plan needs all 4 devices; the planner sparsifies the links
  it finds slow (``adatopk=True``, lowest density ``moeflow.cli.geo.MIN_DENSITY``).
* **pipeline_diloco**: ``geo train --mode pipeline-diloco``: a 2-stage pipeline in each site,
  DiLoCo between the sites (H inner steps, outer Nesterov lr 0.7 momentum 0.9).
* **diloco**: ``geo train --mode diloco``: one data-parallel replica per device (4), the same
  H and outer optimizer (Douillard et al., arXiv 2311.08105).
* **ddp**: ``torch.nn.parallel.DistributedDataParallel`` over the 4 devices (gloo).

Every arm trains on ``BATCH`` sequences per step in micro-batches of ``MICROBATCH`` sequences
on every device (a pipeline replica of ``b`` sequences runs ``b / MICROBATCH`` GPipe
micro-batches; DDP and DiLoCo one micro-batch per device), AdamW lr 3e-3, from the same seeded
model. The target loss is the mean training loss of DDP's
steps 281-300; an arm reaches it at the first step whose trailing 20-step mean is at or below
it, and its wall time to the target is the elapsed time of its training loop at that step
(process start, tracing and rendezvous excluded, the same for every arm). A device's compute
utilization is its busy time over the wall time of its loop, measured on the device: busy is
the time not blocked on a transfer (a pipeline receive or a send's completion, an all-reduce;
for DDP the time from the last gradient bucket's hook to the end of the backward, where DDP
waits for its all-reduces, counts as blocked). A device a plan leaves out is 0% busy.

    python benchmarks/geo_train.py                      # record in benchmarks/results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import cpu_name, write_record  # noqa: E402

#: the demo MoE model of every arm (``geo train``'s defaults for the rest: ffn 128, top-2)
MODEL = dict(dim=32, layers=2, heads=2, seq_len=64, experts=4)
#: sequences per training step, every arm
BATCH = 16
#: sequences per micro-batch on every device of every arm (the same per-operation efficiency)
MICROBATCH = 4
DEVICES = ("a0", "a1", "b0", "b1")  # nodes 0-3; site = first letter
#: H of both DiLoCo arms: the larger of the two the geo_diloco record measured (its 200-step
#: loss was closer to data parallel's at H = 50 than at H = 10)
INNER_STEPS = 50
TARGET_STEPS = 300
WINDOW = 20
#: steps each arm runs, per target step (an arm that converges slower per step gets more)
STEP_FACTOR = {
    "ddp": 1,
    "pipeline": 1.5,
    "pipeline_adatopk": 1.5,
    "pipeline_diloco": 3,
    "diloco": 4,
}
ARMS = tuple(STEP_FACTOR)
CGROUP_ROOT = "/sys/fs/cgroup/cpu"
CFS_PERIOD_US = 10_000


# ---- devices: one CPU cgroup per node ------------------------------------------------------
def _cgroup(i: int) -> str:
    import emulated_cluster as ec

    return os.path.join(CGROUP_ROOT, f"{ec.PREFIX}-dev{i}")


def cgroups_unavailable() -> str | None:
    if not os.path.isfile(os.path.join(CGROUP_ROOT, "cpu.cfs_quota_us")):
        return f"no cgroup-v1 cpu controller at {CGROUP_ROOT}"
    if not os.access(CGROUP_ROOT, os.W_OK):
        return "the cpu cgroup is not writable (needs root)"
    return None


def cgroups_up(n: int, share: float) -> None:
    for i in range(n):
        path = _cgroup(i)
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "cpu.cfs_period_us"), "w") as f:
            f.write(str(CFS_PERIOD_US))
        with open(os.path.join(path, "cpu.cfs_quota_us"), "w") as f:
            f.write(str(int(share * CFS_PERIOD_US)))


def cgroups_down(n: int) -> None:
    for i in range(n):
        for _ in range(50):  # a process that just exited may still be listed for a moment
            try:
                os.rmdir(_cgroup(i))
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def in_cgroup(i: int, cmd: list[str]) -> list[str]:
    """``cmd`` started inside device ``i``'s cgroup (its children inherit it)."""
    procs = os.path.join(_cgroup(i), "cgroup.procs")
    return ["sh", "-c", f'echo $$ > {procs} && exec "$@"', "sh", *cmd]


# ---- the DDP arm, one rank (run by torchrun inside a namespace) ------------------------------
def ddp_worker(steps: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel as DDP

    from moeflow.geo.pipeline import Batches, GeoJob, build_module

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=1800))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == BATCH // MICROBATCH, world  # one micro-batch per device
    job = GeoJob(**MODEL, microbatch_size=MICROBATCH, microbatches=BATCH // MICROBATCH, steps=steps)
    model = DDP(build_module(job))
    marks: list[float] = []
    nbytes = [0]

    def hook(state, bucket):  # a bucket is ready: its gradients are computed
        marks.append(time.perf_counter())
        buf = bucket.buffer()
        nbytes[0] += buf.numel() * buf.element_size()  # handed to all-reduce
        return default_hooks.allreduce_hook(state, bucket)

    model.register_comm_hook(None, hook)
    opt = torch.optim.AdamW(model.parameters(), lr=job.lr)
    batches = Batches(job)  # the step's BATCH sequences as `world` micro-batches
    losses, elapsed, blocked = [], [], 0.0
    dist.barrier()
    t_start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(steps):
        idx, tgt = batches(step)[rank]
        loss = model(idx, tgt)
        marks.clear()
        loss.backward()
        blocked += time.perf_counter() - marks[-1]  # DDP waiting for its all-reduces
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        elapsed.append(time.perf_counter() - t_start)
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    mine = {"losses": losses, "elapsed": elapsed, "wall": wall, "busy": wall - blocked, "cpu": cpu}
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(
                {
                    "losses": [statistics.mean(x) for x in zip(*(e["losses"] for e in every))],
                    "elapsed_s": [max(x) for x in zip(*(e["elapsed"] for e in every))],
                    "wall_s": [e["wall"] for e in every],
                    "busy_s": [e["busy"] for e in every],
                    "cpu_s": [e["cpu"] for e in every],
                    "allreduce_bytes_per_step": nbytes[0] / steps,
                },
                f,
            )
    dist.barrier()
    dist.destroy_process_group()


def rate_worker(out: str) -> None:
    """Sustained training FLOP/s of one device (run inside a device's cgroup)."""
    import torch

    from moeflow.geo.pipeline import GeoJob, trace_job

    torch.set_num_threads(1)
    job = GeoJob(**MODEL, microbatch_size=MICROBATCH)
    module, traced = trace_job(job)
    x = torch.randint(0, 256, (job.microbatch_size, job.seq_len))
    for _ in range(3):
        module(x, x).backward()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        module(x, x).backward()
        times.append(time.perf_counter() - t)
    flops = 3 * sum(n.flops for n in traced.ops.nodes)
    with open(out, "w") as f:
        json.dump({"flops": flops / statistics.median(times), "step_s": times}, f)


# ---- emulated runs ---------------------------------------------------------------------------
def torchrun_on(ec, node_of_rank: list[int], cmd: list[str], port: int, wrap=None) -> list[int]:
    """Run ``cmd`` as a torchrun job, rank r in namespace ``node_of_rank[r]`` (started by
    ``wrap(node, command)`` when given: a namespace remounts /sys, so a cgroup is entered
    before it)."""
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
        full = ec.node_command(node, tr + cmd, env={"OMP_NUM_THREADS": "1"})
        procs.append(
            subprocess.Popen(
                full if wrap is None else wrap(node, full),
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


def model_flags(microbatch_size: int, microbatches: int) -> list[str]:
    out = [f"--{k.replace('_', '-')}={v}" for k, v in MODEL.items()]
    return out + [f"--microbatch-size={microbatch_size}", f"--microbatches={microbatches}"]


def devices_doc(rate: str, flops: float, memory_bytes: float) -> dict:
    import emulated_cluster as ec

    mbps = ec.rate_bits(rate) / 1e6
    return {
        "devices": [
            {"name": n, "flops": flops, "memory_bytes": memory_bytes, "site": n[0]} for n in DEVICES
        ],
        "sites": {
            "a": {"bandwidth_mbps": 1000, "latency_ms": 0.1},
            "b": {"bandwidth_mbps": 1000, "latency_ms": 0.1},
        },
        "site_links": [{"a": "a", "b": "b", "bandwidth_mbps": mbps, "latency_ms": 1}],
    }


def model_memory(ops, microbatches: int) -> float:
    """What the planner charges for the whole model on one device (``moeflow.plan.geo``)."""
    params = sum(n.param_bytes for n in ops.nodes)
    saved = sum(n.saved_bytes for n in ops.nodes)
    return 4.0 * params + microbatches * saved


def plans(rate: str, flops: float, memory_fraction: float) -> dict:
    """The two pipeline arms' plans for ``rate`` (traced at their micro-batch size)."""
    from moeflow.cli.geo import MIN_DENSITY
    from moeflow.errors import PlanError
    from moeflow.geo.pipeline import GeoJob, trace_job
    from moeflow.plan import geo as pgeo

    out = {}
    m = BATCH // MICROBATCH
    _, traced = trace_job(GeoJob(**MODEL, microbatch_size=MICROBATCH))
    # exact: any device holds the model
    graph = pgeo.DeviceGraph.from_dict(devices_doc(rate, flops, 4e9))
    out["pipeline"] = (pgeo.partition(traced.ops, graph, microbatches=m), MICROBATCH, m)
    # memory forces the pipeline over all 4 devices, across the slow link
    need = model_memory(traced.ops, m)
    frac = memory_fraction
    while True:  # the smallest fraction from the given one up at which a 4-device plan fits
        graph = pgeo.DeviceGraph.from_dict(devices_doc(rate, flops, frac * need))
        try:
            plan = pgeo.partition(
                traced.ops, graph, microbatches=m, adatopk=True, min_density=MIN_DENSITY
            )
            break
        except PlanError:
            frac += 0.02
    out["pipeline_adatopk"] = (plan, MICROBATCH, m)
    out["memory_fraction"] = frac
    return out


def run_arm(ec, name: str, steps: int, plan_info, tmp: str, port: int) -> dict:
    tmp = tempfile.mkdtemp(prefix=f"{name}_", dir=tmp)  # a fresh folder per run
    path = os.path.join(tmp, f"{name}.json")
    wrap = in_cgroup
    if name == "ddp":
        cmd = [os.path.abspath(__file__), "--ddp-worker", "--steps", str(steps), "--json", path]
        nodes = [0, 1, 2, 3]
    elif name in ("pipeline", "pipeline_adatopk"):
        plan, mbs, m = plan_info
        plan_file = os.path.join(tmp, f"{name}_plan.json")
        with open(plan_file, "w") as f:
            doc = {"plan": {"bounds": list(plan.bounds), "densities": list(plan.densities)}}
            json.dump(doc, f)
        cmd = ["-m", "moeflow.cli.geo", "train", "--plan", plan_file, "--steps", str(steps)]
        cmd += model_flags(mbs, m) + ["--timeout", "1800", "--json", path]
        nodes = list(plan.devices)
    else:
        mode = "diloco" if name == "diloco" else "pipeline-diloco"
        cmd = ["-m", "moeflow.cli.geo", "train", "--mode", mode, "--steps", str(steps)]
        cmd += ["--inner-steps", str(INNER_STEPS), "--timeout", "1800", "--json", path]
        if name == "diloco":  # a replica per device: one micro-batch
            cmd += model_flags(MICROBATCH, BATCH // 4 // MICROBATCH)
        else:  # a replica per site, 2 stages: half the batch each
            cmd += ["--stages", "2"] + model_flags(MICROBATCH, BATCH // 2 // MICROBATCH)
        nodes = [0, 1, 2, 3]  # rank r * 2 + s: replica 0 in site a, replica 1 in site b
    t0 = time.perf_counter()
    load = os.getloadavg()[0]
    codes = torchrun_on(ec, nodes, cmd, port, wrap=wrap)
    total = time.perf_counter() - t0
    load = [load, os.getloadavg()[0]]  # the machine's 1-minute load before and after
    if any(codes):
        return {"error": f"exit codes {codes}", "process_wall_s": total, "loadavg": load}
    with open(path) as f:
        res = json.load(f)
    util = [0.0] * len(DEVICES)
    for rank, node in enumerate(nodes):
        util[node] = res["busy_s"][rank] / res["wall_s"][rank]
    return {
        "steps": steps,
        "nodes": nodes,
        "losses": res["losses"],
        "elapsed_s": res["elapsed_s"],
        "wall_s": res["wall_s"],
        "busy_s": res["busy_s"],
        "cpu_s": res.get("cpu_s"),
        "utilization": util,
        "tokens_per_s": steps * BATCH * MODEL["seq_len"] / max(res["wall_s"]),
        "process_wall_s": total,
        "loadavg": load,
        "wire_bytes": res.get("wire_bytes"),
        "allreduce_bytes": res.get("allreduce_bytes", res.get("allreduce_bytes_per_step")),
    }


def time_to(losses: list[float], elapsed: list[float], target: float) -> tuple:
    """(step, seconds) where the trailing WINDOW-step mean first reaches ``target``."""
    for k in range(WINDOW - 1, len(losses)):
        if statistics.mean(losses[k - WINDOW + 1 : k + 1]) <= target:
            return k + 1, elapsed[k]
    return None, None


def emulated(rate: str, order: list[str], plan_of: dict, target_steps: int, tmp: str) -> dict:
    import emulated_cluster as ec

    ec.up_sites([2, 2], "1gbit", rate)
    out = {}
    port = 29870
    try:
        for name in order:
            port += 1
            steps = int(STEP_FACTOR[name] * target_steps)
            if name != "ddp":
                steps -= steps % INNER_STEPS if "diloco" in name else 0
            print(f"geo_train: {rate} {name} ({steps} steps)", file=sys.stderr, flush=True)
            out[name] = run_arm(ec, name, steps, plan_of.get(name), tmp, port)
    finally:
        ec.down()
    return out


def analyse(cell: dict, target_steps: int) -> dict:
    ddp = cell.get("ddp", {})
    if "losses" not in ddp or len(ddp["losses"]) < target_steps:
        return {"target": None}
    target = statistics.mean(ddp["losses"][target_steps - WINDOW : target_steps])
    out = {"target": target, "arms": {}}
    for name, c in cell.items():
        if "losses" not in c:
            continue
        step, secs = time_to(c["losses"], c["elapsed_s"], target)
        out["arms"][name] = {"step": step, "seconds": secs}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="100mbit,10mbit")
    ap.add_argument("--target-steps", type=int, default=TARGET_STEPS)
    ap.add_argument("--core-share", type=float, default=0.5)
    ap.add_argument("--memory-fraction", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0, help="seeds the arms' order per rate")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--host", default=f"{os.cpu_count()}cpu-x86")
    ap.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rate-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--steps", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    ap.add_argument("--report-from", help="rewrite the markdown of this record's JSON (no run)")
    ap.add_argument(
        "--earlier",
        nargs="*",
        default=[],
        help="with --report-from: JSON records of earlier runs of this script whose times to "
        "the target go into the record too (the spread between runs)",
    )
    args = ap.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(args.steps, args.json)
        return 0
    if args.rate_worker:
        rate_worker(args.json)
        return 0
    import emulated_cluster as ec
    import torch

    if args.report_from:
        with open(args.report_from) as f:
            info = json.load(f)
        info.setdefault("isa", isa())
        for path in args.earlier:
            with open(path) as f:
                old = json.load(f)
            info.setdefault("earlier_runs", []).append(_times(old))
        with open(args.report_from[: -len(".json")] + ".md", "w") as f:
            f.write("\n".join(report(info, info["command"], info["torch"])) + "\n")
        with open(args.report_from, "w") as f:
            json.dump(info, f, indent=1)
        return 0
    date = datetime.date.today().isoformat()
    reason = ec.unavailable() or cgroups_unavailable()
    rates = args.rates.split(",")
    info = {
        "date": date,
        "host": args.host,
        "machine": cpu_name(),
        "isa": isa(),
        "torch": torch.__version__,
        "model": MODEL,
        "batch": BATCH,
        "inner_steps": INNER_STEPS,
        "target_steps": args.target_steps,
        "core_share": args.core_share,
        "step_factor": STEP_FACTOR,
        "rates": {},
    }
    cmdline = (
        f"python benchmarks/geo_train.py --rates {args.rates} --target-steps "
        f"{args.target_steps} --core-share {args.core_share} --memory-fraction "
        f"{args.memory_fraction} --seed {args.seed}"
    )
    info["command"] = cmdline
    if reason:
        info["skipped"] = reason
        write_record(args.out, f"geo_train_{args.host}_{date}", info, [f"skipped: {reason}"])
        return 0
    tmp = tempfile.mkdtemp(prefix="geo_train_")
    cgroups_up(len(DEVICES), args.core_share)
    try:
        rate_file = os.path.join(tmp, "rate.json")
        subprocess.run(
            in_cgroup(0, [sys.executable, os.path.abspath(__file__), "--rate-worker", "--json",
                          rate_file]),
            check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        with open(rate_file) as f:
            flops = json.load(f)["flops"]
        info["device_flops"] = flops
        rng = random.Random(args.seed)
        for rate in rates:
            plan_of = plans(rate, flops, args.memory_fraction)
            order = list(ARMS)
            rng.shuffle(order)
            cell = emulated(rate, order, plan_of, args.target_steps, tmp)
            info["rates"][rate] = {
                "order": order,
                "memory_fraction": plan_of["memory_fraction"],
                "plans": {
                    k: {
                        "bounds": list(p[0].bounds),
                        "devices": [DEVICES[d] for d in p[0].devices],
                        "densities": list(p[0].densities),
                        "predicted_step_s": p[0].step_time_s,
                        "microbatch_size": p[1],
                        "microbatches": p[2],
                    }
                    for k, p in plan_of.items()
                    if k != "memory_fraction"
                },
                "runs": cell,
                "to_target": analyse(cell, args.target_steps),
            }
    finally:
        cgroups_down(len(DEVICES))
    lines = report(info, cmdline, torch.__version__)
    write_record(args.out, f"geo_train_{args.host}_{date}", info, lines)
    return 0


def _times(info: dict) -> dict:
    """rate -> arm -> its time to the target (``step``, ``seconds``) or its ``error``."""
    return {
        rate: {
            name: (
                {"error": r["error"]}
                if "error" in r
                else cell["to_target"].get("arms", {}).get(name, {})
            )
            for name, r in cell["runs"].items()
        }
        for rate, cell in info["rates"].items()
    }


def isa() -> str:
    """The vector extensions that matter for fp32/bf16 CPU kernels on this machine."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return "unknown"
    if "avx512_bf16" in flags:
        return "AVX-512 BF16"
    return "AVX2 only" if "avx2" in flags else "no AVX2"


def _fmt_s(x) -> str:
    return "never" if x is None else f"{x:.1f}"


def report(info: dict, cmdline: str, torch_version: str) -> list[str]:
    date, host = info["date"], info["host"]
    lines = [
        f"# Training across two emulated sites: wall time to a target loss ({date}, {host})",
        "",
        f"Command (as root, from the repository root, `PYTHONPATH=src`): `{cmdline}`. "
        f"CPU: {info['machine']} ({info.get('isa', 'unknown')}); Python "
        f"{platform.python_version()}, torch {torch_version}. "
        f"Demo MoE model {MODEL} (ffn 128, top-2 of 4 experts), {BATCH} sequences of "
        f"{MODEL['seq_len']} tokens per step in every arm, in micro-batches of {MICROBATCH} "
        f"sequences on every device, fp32, AdamW lr 3e-3, one torch "
        f"thread per rank. 2 sites x 2 nodes (network namespaces), 1 Gbit/s inside a site, the "
        f"stated rate between the sites (HTB per pair of nodes: each cross-site pair has the "
        f"rate to itself). Each node is one device: one rank in a CPU cgroup with a CFS quota "
        f"of {info['core_share']} core ({info['core_share'] * 4:g} cores for the 4 devices); "
        f"measured device rate {info.get('device_flops', 0) / 1e9:.2f} GFLOP/s (the planner's "
        f"input). DiLoCo arms: H = {info['inner_steps']}, outer Nesterov SGD lr 0.7, momentum "
        f"0.9. Target: the mean training loss of DDP's steps {info['target_steps'] - WINDOW + 1}"
        f"-{info['target_steps']}; an arm reaches it at the first step whose trailing "
        f"{WINDOW}-step mean loss is at or below it (the loss of the step's {BATCH} training "
        "sequences; for DiLoCo arms the mean of the replicas' losses on their shards at their "
        "local parameters). Wall time: the training loop's elapsed time at that step (process "
        "start, tracing and rendezvous excluded). Utilization: per device, busy time (not "
        "blocked on a transfer) over the wall time of its loop, measured on the device. Each "
        "arm ran once per rate, in the order listed; every run is reported. The machine is "
        "shared with other jobs whose load is not controlled (each run's 1-minute load "
        "average before and after is in the JSON where recorded), so the cgroup quotas are "
        "ceilings that were not always met and the timings are noisy. Where the quota does "
        "not bind, a device that waits (a pipeline bubble, a slow transfer) leaves the shared "
        "cores to the others, so an arm with idle devices computes faster while busy than "
        "one whose devices all compute: the CPU column shows what each device got.",
        "",
    ]
    for rate, cell in info["rates"].items():
        tt = cell["to_target"]
        lines += [f"## {rate} between the sites", ""]
        lines.append(f"Order of the runs: {', '.join(cell['order'])}.")
        for k, p in cell["plans"].items():
            d = ", ".join(f"{x:.3g}" for x in p["densities"])
            lines.append(
                f"Plan of {k}: bounds {p['bounds']} on {p['devices']}, densities [{d}], "
                f"{p['microbatches']} micro-batches of {p['microbatch_size']}, predicted step "
                f"{p['predicted_step_s'] * 1e3:.0f} ms"
                + (
                    f" (each device holds {cell['memory_fraction']:.2f} of the whole model's "
                    "memory)"
                    if k == "pipeline_adatopk"
                    else ""
                )
                + "."
            )
        target = tt.get("target")
        lines += [
            "",
            f"Target loss: {target:.4f}." if target is not None else "Target: DDP did not run.",
            "",
            "| arm | steps run | step of target | wall s to target | vs DDP | vs DiLoCo | "
            "tokens/s | utilization a0, a1, b0, b1 | busy ms per step and device | "
            "CPU ms per step and device | final loss (last 20) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
        ]
        arms = tt.get("arms", {})
        ref = {k: arms.get(k, {}).get("seconds") for k in ("ddp", "diloco")}
        for name in ARMS:
            c = cell["runs"].get(name, {})
            if "error" in c:
                lines.append(f"| {name} | {c['error']} | | | | | | | | | |")
                continue
            a = arms.get(name, {})
            secs = a.get("seconds")
            ratio = {
                k: (f"{v / secs:.2f}x" if secs and v else "-") for k, v in ref.items()
            }  # how many times faster than the reference
            util = ", ".join(f"{u:.0%}" for u in c["utilization"])
            busy = statistics.mean(c["busy_s"]) / c["steps"] * 1e3  # the devices it uses
            cpu = "-"
            if c.get("cpu_s"):
                cpu = f"{statistics.mean(c['cpu_s']) / c['steps'] * 1e3:.1f}"
            lines.append(
                f"| {name} | {c['steps']} | {a.get('step') or 'never'} | {_fmt_s(secs)} | "
                f"{ratio['ddp']} | {ratio['diloco']} | {c['tokens_per_s']:.0f} | {util} | "
                f"{busy:.1f} | {cpu} | {statistics.mean(c['losses'][-WINDOW:]):.4f} |"
            )
        lines += [
            "",
            "vs DDP / vs DiLoCo: the reference's wall time to the target over this arm's "
            "(above 1: this arm is faster). Busy ms per step: the mean over the devices the "
            "arm uses of their busy time over the steps run; CPU ms per step: the same of the "
            "CPU time their processes used (all threads; at most the quota's share of the "
            "wall time when the quota binds).",
            "",
        ]
        ours = [
            (arms[k]["seconds"], k)
            for k in ("pipeline", "pipeline_adatopk", "pipeline_diloco")
            if arms.get(k, {}).get("seconds")
        ]
        if ours and all(ref.values()):
            secs, best = min(ours)
            used = cell["runs"][best]["utilization"]
            lines += [
                f"Fastest moeflow mode to the target: {best}, {ref['diloco'] / secs:.2f}x "
                f"DiLoCo's speed and {ref['ddp'] / secs:.2f}x DDP's (target: faster than "
                f"both); its devices' utilization {min(used):.0%}-{max(used):.0%} "
                "(target at 10 Mbit/s: >= 80%).",
                "",
            ]
    earlier = info.get("earlier_runs", [])
    if earlier:
        lines += [
            "## Every run of this command",
            "",
            "Wall seconds to the target of each arm in the earlier complete runs of this "
            "command on this machine, with the code of their commit (the script's git "
            "history), and in the run above (last column); an arm whose processes failed is "
            "marked so.",
            "",
            "| rate | arm | " + " | ".join(f"run {i + 1}" for i in range(len(earlier) + 1)) + " |",
            "| --- | --- |" + " ---: |" * (len(earlier) + 1),
        ]
        runs = [*earlier, _times(info)]
        for rate in info["rates"]:
            for name in ARMS:
                cells = []
                for run in runs:
                    a = run.get(rate, {}).get(name, {})
                    cells.append("failed" if "error" in a else _fmt_s(a.get("seconds")))
                lines.append(f"| {rate} | {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
