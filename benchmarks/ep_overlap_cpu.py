"""How much all-to-all the pipelined EP runtime hides on CPU (4 gloo ranks as 2 nodes x 2).

For each pipeline degree r in {1, 2, 4, 8} it times one MoE layer step, forward and
forward+backward, three ways on the same routing:
  * full        - the real step (count exchange, chunked dispatch / experts / combine);
  * experts     - the same step with every collective removed (the count exchange is
                  replayed from a real call; all-to-alls return buffers of the right size);
  * comm        - the same step with the expert FFN replaced by a copy;
  * local       - both removed: routing, permutation, reorders, combine (in all three).
Pure costs: X = experts - local, C = comm - local. Without overlap full = local + X + C;
FSMoE's overlap can hide at most min(X, C) ("hideable"). Hidden fraction at r:
    hidden(r) = (local + X + C - full) / min(X, C).
Times are the max over ranks per iteration; median and minimum over iterations, with
degrees and modes interleaved inside each iteration (the machine is shared).

    python benchmarks/ep_overlap_cpu.py [--tokens 2048 --dim 256 --ffn 64 ...]
writes benchmarks/results/ep_overlap_cpu_<hardware>_<date>[_link].md and .json (and prints
the table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time

import torch
import torch.distributed as dist
from _common import cpu_name  # noqa: E402  (benchmarks/ is on sys.path)


def _layer(args):
    from moeflow import MoEConfig, MoELayer

    cfg = MoEConfig(
        hidden_size=args.dim,
        ffn_hidden_size=args.ffn,
        num_experts=args.experts,
        top_k=args.top_k,
        router="softmax_topk",
    )
    torch.manual_seed(0)
    return MoELayer(cfg)


def _fake_a2a(x_RD, in_splits, out_splits, group, op, timeout_s):
    from moeflow.comm.timeouts import Pending

    return Pending.ready(x_RD.new_empty((sum(int(s) for s in out_splits),) + tuple(x_RD.shape[1:])))


class EmulatedLink:
    """A rank's network port as a separate resource: ``alpha + bytes / bandwidth`` per send.

    Transfers on one port are serialised (``busy_until``); waiting sleeps, so the link costs
    wall time but no CPU, as a NIC's DMA does. The real gloo all-to-all still runs (the
    data must move); its completion is additionally held until the emulated link is done.
    """

    def __init__(self, mbps: float, alpha_ms: float):
        self.s_per_byte = 1.0 / (mbps * 1e6)
        self.alpha_s = alpha_ms * 1e-3
        self.busy_until = 0.0

    def wrap(self, real):
        from moeflow.comm.timeouts import Pending

        def a2a(x_RD, in_splits, out_splits, group, op, timeout_s):
            p = real(x_RD, in_splits, out_splits, group, op, timeout_s)
            me = dist.get_rank(group) if len(in_splits) > 1 else 0
            sent = sum(int(n) for j, n in enumerate(in_splits) if j != me)
            nbytes = sent * x_RD[0].numel() * x_RD.element_size() if x_RD.shape[0] else 0
            start = max(time.perf_counter(), self.busy_until)
            self.busy_until = done = start + self.alpha_s + nbytes * self.s_per_byte

            def finish():
                out = p.wait()
                left = done - time.perf_counter()
                if left > 0:
                    time.sleep(left)
                return out

            return Pending(None, op, timeout_s, finish)

        return a2a


def _time_once(fn):
    """Wall time (max over ranks) and CPU time (sum over ranks, all threads) of one call."""
    dist.barrier()
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    w = torch.tensor([wall], dtype=torch.float64)
    c = torch.tensor([cpu], dtype=torch.float64)
    dist.all_reduce(w, op=dist.ReduceOp.MAX)
    dist.all_reduce(c, op=dist.ReduceOp.SUM)
    return float(w) * 1e3, float(c) * 1e3


def _rank(rank, world, args):
    """One rank (forked by moeflow.launch, gloo group up); rank 0 returns the timings."""
    import moeflow.parallel.contract as dispatch_mod  # CommStep.issue's all_to_all_v
    from moeflow.comm import Topology
    from moeflow.parallel import ExpertParallel

    ep = ExpertParallel(
        _layer(args),
        topology=Topology.explicit(world, args.ranks_per_node),
        dispatcher=args.dispatcher,
        timeout_s=120,
    )
    torch.manual_seed(100 + rank)
    x = torch.randn(args.tokens, args.dim)
    xg = x.clone().requires_grad_(True)
    real_exchange = ep.dispatcher.exchange
    ex_cache = {}

    def replay_exchange(counts_E, **kw):  # the counts a real call exchanged, no comm
        return ex_cache["ex"].__class__(
            **{
                k: getattr(ex_cache["ex"], k)
                for k in ("counts_E", "send_PE", "recv_SPE", "full_PPE", "slots", "num_rows")
            }
        )

    def record_exchange(counts_E, **kw):
        ex_cache["ex"] = real_exchange(counts_E, **kw)
        return ex_cache["ex"]

    ep.dispatcher.exchange = record_exchange
    with torch.no_grad():
        ep(x)
    ep.dispatcher.exchange = real_exchange
    rows = int(ex_cache["ex"].recv_SPE.sum())

    rows_out = {}
    modes = ("full", "experts", "comm", "local")

    link = EmulatedLink(args.link_mbps, args.link_alpha_ms) if args.link_mbps else None

    def step(mode, r, backward):
        from moeflow.kernels import expert_ffn

        real_a2a = dispatch_mod.all_to_all_v
        if link is not None and mode in ("full", "comm"):
            link.busy_until = 0.0
            dispatch_mod.all_to_all_v = link.wrap(real_a2a)
        if mode in ("experts", "local"):  # no collectives: replayed counts, empty buffers
            dispatch_mod.all_to_all_v = _fake_a2a
            ep.dispatcher.exchange = replay_exchange
        if mode in ("comm", "local"):  # no expert GEMMs
            ep.expert_fn = lambda x_e, counts, wi, wo, act, k: x_e * 1.0
        try:
            if backward:
                ep.zero_grad(set_to_none=True)
                ep(xg, r_fwd=r, r_bwd=r).sum().backward()
            else:
                with torch.no_grad():
                    ep(x, r_fwd=r, r_bwd=r)
        finally:
            dispatch_mod.all_to_all_v = real_a2a
            ep.dispatcher.exchange = real_exchange
            ep.expert_fn = expert_ffn

    for backward in (False, True):
        samples = {(r, m): [] for r in args.degrees for m in modes}
        for it in range(args.warmup + args.iters):
            # interleave degrees and modes, so load from other processes hits all alike
            for r in args.degrees:
                for m in modes:
                    wall, cpu = _time_once(lambda m=m, r=r, b=backward: step(m, r, b))
                    if it >= args.warmup:
                        samples[(r, m)].append((wall, cpu))
        for (r, m), v in samples.items():
            walls = [w for w, _ in v]
            cpus = [c for _, c in v]
            rows_out.setdefault((r, m), {})["fwd+bwd" if backward else "fwd"] = {
                "median_ms": statistics.median(walls),
                "min_ms": min(walls),
                "cpu_ms_all_ranks": statistics.median(cpus),
            }
    if rank == 0:
        return {
            "rows_per_rank": rows,
            "cores": os.cpu_count(),
            "times": {f"{r}|{m}": v for (r, m), v in rows_out.items()},
        }
    return None


def measure(args) -> dict:
    from moeflow.launch import launch

    return launch(
        _rank,
        args.world,
        args,
        name="ep_overlap_cpu",
        threads=args.threads,
        stall_timeout_s=300,
        pg_timeout_s=300,
    )[0]


def table(res: dict, degrees, stat: str = "median_ms") -> tuple[str, dict]:
    t = res["times"]
    lines = [
        "| r | kind | full | experts-only | comm-only | local | X = exp-local | "
        "C = comm-local | no-overlap = local+X+C | hideable = min(X,C) | hidden | "
        "hidden % | speedup vs r=1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    best = {}
    for kind in ("fwd", "fwd+bwd"):
        base = t["1|full"][kind][stat]
        for r in degrees:
            full, exp, comm, loc = (
                t[f"{r}|{m}"][kind][stat] for m in ("full", "experts", "comm", "local")
            )
            X, C = exp - loc, comm - loc
            seq = loc + X + C
            hideable = min(X, C)
            hidden = seq - full
            frac = hidden / hideable if hideable > 0 else float("nan")
            lines.append(
                f"| {r} | {kind} | {full:.1f} | {exp:.1f} | {comm:.1f} | {loc:.1f} | "
                f"{X:.1f} | {C:.1f} | {seq:.1f} | {hideable:.1f} | {hidden:.1f} | "
                f"{100 * frac:.0f}% | {base / full:.2f}x |"
            )
            if kind not in best or full < best[kind][1]:
                best[kind] = (r, full, frac)
    return "\n".join(lines), best


def cpu_table(res: dict, degrees) -> str:
    """CPU time (user+sys, all threads, summed over ranks) per mode: what the cores did."""
    t = res["times"]
    cores = res.get("cores", 2)
    lines = [
        "| r | kind | CPU full | CPU experts-only | CPU comm-only | CPU local | "
        "CPU of comm (comm-local) | full wall (median) | cores busy in full |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("fwd", "fwd+bwd"):
        for r in degrees:
            cf, ce, cc, cl = (
                t[f"{r}|{m}"][kind]["cpu_ms_all_ranks"]
                for m in ("full", "experts", "comm", "local")
            )
            wall = t[f"{r}|full"][kind]["median_ms"]
            lines.append(
                f"| {r} | {kind} | {cf:.1f} | {ce:.1f} | {cc:.1f} | {cl:.1f} | "
                f"{cc - cl:.1f} | {wall:.1f} | {cf / wall:.2f} of {cores} |"
            )
    return "\n".join(lines)


def render(res: dict, degrees) -> str:
    """The three tables of a record (median, minimum, CPU time) as markdown."""
    tab, _ = table(res, degrees, "median_ms")
    tab_min, _ = table(res, degrees, "min_ms")
    return (
        f"Median over iterations (ms)\n\n{tab}\n\nMinimum over iterations (ms)\n\n"
        f"{tab_min}\n\nCPU time, user+sys, all threads, summed over ranks (ms)\n\n"
        f"{cpu_table(res, degrees)}\n"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--ranks-per-node", type=int, default=2)
    p.add_argument("--dispatcher", default="2dh", choices=["a2a", "capacity", "2dh"])
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--degrees", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--link-mbps",
        type=float,
        default=0.0,
        help="emulate each rank's port as a separate link of this many MB/s "
        "(0: loopback gloo only)",
    )
    p.add_argument("--link-alpha-ms", type=float, default=0.2)
    p.add_argument("--out", default=None, help="markdown record (default: dated file)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    load0 = " ".join(f"{v:.2f}" for v in os.getloadavg())
    res = measure(args)
    tab, best = table(res, args.degrees, "median_ms")
    tab_min, best_min = table(res, args.degrees, "min_ms")
    cmd = "python benchmarks/ep_overlap_cpu.py " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    head = (
        f"EP overlap on CPU: {args.world} gloo ranks as {args.world // args.ranks_per_node} "
        f"nodes x {args.ranks_per_node}, dispatcher {args.dispatcher}, T={args.tokens}/rank, "
        f"D={args.dim}, F={args.ffn}, E={args.experts}, top-{args.top_k}, "
        f"{res['rows_per_rank']} expert rows/rank, {args.threads} thread/rank; "
        f"load average before {load0}"
        + (
            f"; EMULATED link {args.link_mbps:g} MB/s + {args.link_alpha_ms:g} ms per send"
            if args.link_mbps
            else ""
        )
    )
    print(head)
    print("median over iterations (ms):")
    print(tab)
    print("minimum over iterations (ms):")
    print(tab_min)
    ctab = cpu_table(res, args.degrees)
    print("CPU time, all ranks and threads (ms):")
    print(ctab)
    for name, b in (("median", best), ("min", best_min)):
        for kind, (r, full, frac) in b.items():
            print(
                f"best {kind} ({name}): r={r}, {full:.1f} ms, hidden {100 * frac:.0f}% of "
                f"hideable comm"
            )
    if not args.no_record:
        date = datetime.date.today().isoformat()
        hw = f"{os.cpu_count()}cpu-{platform.machine()}"
        path = args.out or os.path.join(
            os.path.dirname(__file__),
            "results",
            f"ep_overlap_cpu_{hw}_{date}" + ("_link" if args.link_mbps else "") + ".md",
        )
        with open(path, "w") as f:
            f.write(
                f"# {head}\n\ndate {date}; machine: {os.cpu_count()} cores, "
                f"{cpu_name()}, no GPU; "
                f"torch {torch.__version__}\n\ncommand: `{cmd}`\n\n" + render(res, args.degrees)
            )
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump(res, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
