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
Times are the max over ranks per iteration, median over iterations.

    python benchmarks/ep_overlap_cpu.py [--tokens 2048 --dim 256 --ffn 64 ...]
writes benchmarks/results/ep_overlap_cpu_<date>.md (and prints the table).
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist


def _layer(args):
    from moeflow import MoEConfig, MoELayer
    cfg = MoEConfig(hidden_size=args.dim, ffn_hidden_size=args.ffn, num_experts=args.experts,
                    top_k=args.top_k, router="softmax_topk")
    torch.manual_seed(0)
    return MoELayer(cfg)


def _fake_a2a(x_RD, in_splits, out_splits, group, op, timeout_s):
    from moeflow.comm.timeouts import Pending
    return Pending.ready(x_RD.new_empty((sum(int(s) for s in out_splits),) + tuple(x_RD.shape[1:])))


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


def _worker(rank, world, port, args, conn):
    try:
        torch.set_num_threads(args.threads)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=300))
        import moeflow.comm.dispatch as dispatch_mod
        from moeflow.comm import Topology
        from moeflow.runtime import ExpertParallel

        ep = ExpertParallel(_layer(args), topology=Topology.explicit(world, args.ranks_per_node),
                            dispatcher=args.dispatcher, timeout_s=120)
        torch.manual_seed(100 + rank)
        x = torch.randn(args.tokens, args.dim)
        xg = x.clone().requires_grad_(True)
        real_exchange = ep.dispatcher.exchange
        ex_cache = {}

        def replay_exchange(counts_E, **kw):  # the counts a real call exchanged, no comm
            return ex_cache["ex"].__class__(**{k: getattr(ex_cache["ex"], k) for k in
                                              ("counts_E", "send_PE", "recv_SPE", "full_PPE",
                                               "slots", "num_rows")})

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

        def step(mode, r, backward):
            from moeflow.kernels import expert_ffn
            real_a2a = dispatch_mod.all_to_all_v
            if mode in ("experts", "local"):   # no collectives: replayed counts, empty buffers
                dispatch_mod.all_to_all_v = _fake_a2a
                ep.dispatcher.exchange = replay_exchange
            if mode in ("comm", "local"):      # no expert GEMMs
                ep._expert_fn = lambda x_e, counts, wi, wo, act, k: x_e * 1.0
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
                ep._expert_fn = expert_ffn

        for r in args.degrees:
            for backward in (False, True):
                samples = {m: [] for m in modes}
                for it in range(args.warmup + args.iters):
                    for m in modes:            # interleaved, so load drift hits all modes
                        wall, cpu = _time_once(lambda: step(m, r, backward))
                        if it >= args.warmup:
                            samples[m].append((wall, cpu))
                for m in modes:
                    walls = [w for w, _ in samples[m]]
                    cpus = [c for _, c in samples[m]]
                    rows_out.setdefault((r, m), {})["fwd+bwd" if backward else "fwd"] = {
                        "median_ms": statistics.median(walls), "min_ms": min(walls),
                        "cpu_ms_all_ranks": statistics.median(cpus)}
        if rank == 0:
            conn.send(("ok", {"rows_per_rank": rows, "cores": os.cpu_count(),
                              "times": {f"{r}|{m}": v for (r, m), v in rows_out.items()}}))
        else:
            conn.send(("ok", None))
        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001
        import traceback
        conn.send(("err", f"rank {rank}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def measure(args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    procs, conns = [], []
    for r in range(args.world):
        a, b = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_worker, args=(r, args.world, port, args, b))
        p.start()
        b.close()
        procs.append(p)
        conns.append(a)
    out = None
    for r, c in enumerate(conns):
        msg = c.recv()
        if msg[0] != "ok":
            raise RuntimeError(msg[1])
        if r == 0:
            out = msg[1]
    for p in procs:
        p.join(60)
    return out


def table(res: dict, degrees, stat: str = "median_ms") -> tuple[str, dict]:
    t = res["times"]
    lines = ["| r | kind | full | experts-only | comm-only | local | X = exp-local | "
             "C = comm-local | no-overlap = local+X+C | hideable = min(X,C) | hidden | "
             "hidden % | speedup vs r=1 | CPU busy (full) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    best = {}
    cores = res.get("cores", 2)
    for kind in ("fwd", "fwd+bwd"):
        base = t["1|full"][kind][stat]
        for r in degrees:
            full, exp, comm, loc = (t[f"{r}|{m}"][kind][stat]
                                    for m in ("full", "experts", "comm", "local"))
            busy = t[f"{r}|full"][kind]["cpu_ms_all_ranks"] / (t[f"{r}|full"][kind]["median_ms"] * cores)
            X, C = exp - loc, comm - loc
            seq = loc + X + C
            hideable = min(X, C)
            hidden = seq - full
            frac = hidden / hideable if hideable > 0 else float("nan")
            lines.append(f"| {r} | {kind} | {full:.1f} | {exp:.1f} | {comm:.1f} | {loc:.1f} | "
                         f"{X:.1f} | {C:.1f} | {seq:.1f} | {hideable:.1f} | {hidden:.1f} | "
                         f"{100 * frac:.0f}% | {base / full:.2f}x | {100 * busy:.0f}% |")
            if kind not in best or full < best[kind][1]:
                best[kind] = (r, full, frac)
    return "\n".join(lines), best


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
    p.add_argument("--out", default=None, help="markdown record (default: dated file)")
    p.add_argument("--no-record", action="store_true")
    args = p.parse_args(argv)
    res = measure(args)
    tab, best = table(res, args.degrees, "median_ms")
    tab_min, best_min = table(res, args.degrees, "min_ms")
    cmd = "python benchmarks/ep_overlap_cpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    head = (f"EP overlap on CPU: {args.world} gloo ranks as {args.world // args.ranks_per_node} "
            f"nodes x {args.ranks_per_node}, dispatcher {args.dispatcher}, T={args.tokens}/rank, "
            f"D={args.dim}, F={args.ffn}, E={args.experts}, top-{args.top_k}, "
            f"{res['rows_per_rank']} expert rows/rank, {args.threads} thread/rank")
    print(head)
    print("median over iterations (ms):")
    print(tab)
    print("minimum over iterations (ms):")
    print(tab_min)
    for name, b in (("median", best), ("min", best_min)):
        for kind, (r, full, frac) in b.items():
            print(f"best {kind} ({name}): r={r}, {full:.1f} ms, hidden {100 * frac:.0f}% of "
                  f"hideable comm")
    if not args.no_record:
        date = datetime.date.today().isoformat()
        path = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        f"ep_overlap_cpu_{date}_raw.md")
        with open(path, "w") as f:
            f.write(f"# {head}\n\ndate {date}; machine: {os.cpu_count()} cores, "
                    f"{platform.processor() or platform.machine()}, no GPU; "
                    f"torch {torch.__version__}\n\ncommand: `{cmd}`\n\n{tab}\n\n"
                    f"```json\n{json.dumps(res, indent=1)}\n```\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
