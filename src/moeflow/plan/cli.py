"""``moeflow plan``: choose FSMoE pipeline degrees and compare with the baselines.

    moeflow plan --model mixtral-8x7b --cluster fsmoe-testbed-a --tokens 8192 [--json]

``--tokens`` is tokens per GPU per step (B * L). The default layout follows FSMoE: expert
parallelism across nodes (N_EP = nodes) and expert sharding inside a node
(N_ESP = GPUs per node); ``--esp 1`` puts all GPUs in one EP group instead.
"""

from __future__ import annotations

import argparse
import json
import sys

from moeflow.errors import MoeflowError


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    from moeflow.clusters import cluster_names
    from moeflow.config import preset_names

    p.add_argument("--model", default="mixtral-8x7b", help=f"one of {preset_names()}")
    p.add_argument("--cluster", default="fsmoe-testbed-a", help=f"one of {cluster_names()}")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per GPU per step (B*L)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length L "
                   "(default min(tokens, 4096))")
    p.add_argument("--nodes", type=int, default=None, help="override the cluster's node count")
    p.add_argument("--esp", type=int, default=None,
                   help="expert-sharding degree inside a node (default: GPUs per node)")
    p.add_argument("--layers", type=int, default=None,
                   help="number of MoE layers (default: the model's)")
    p.add_argument("--perf", default=None,
                   help="PerfModel JSON (from `moeflow profile`); default: the cluster preset")
    p.add_argument("--r-max", type=int, default=16, help="largest pipeline degree searched")


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    add_common_arguments(p)
    p.add_argument("--tutel-r", type=int, default=2, help="Tutel-style fixed degree")
    p.add_argument("--lina-chunk-mb", type=float, default=4.0, help="Lina chunk size (MiB)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", default=None, help="write the FSMoE plan JSON here")


def setup(args):
    """(workloads, perf, cluster, model preset) from the common arguments."""
    from moeflow.clusters import cluster_preset
    from moeflow.config import model_preset
    from moeflow.perf import PerfModel, perf_preset
    from moeflow.perf.presets import h200_8x_ib
    from moeflow.plan.workload import LayerWorkload

    mp = model_preset(args.model)
    cluster = cluster_preset(args.cluster)
    if args.nodes:
        cluster = cluster.with_nodes(args.nodes)
    if args.perf:
        perf = PerfModel.load(args.perf)
    elif cluster.name == "h200-8x-ib":
        perf = h200_8x_ib(cluster.nodes)
    else:
        perf = perf_preset(cluster.name)
    esp = args.esp or cluster.gpus_per_node
    if cluster.world_size % esp:
        from moeflow.errors import DistributedConfigError
        raise DistributedConfigError(f"--esp {esp} must divide the world size "
                                     f"{cluster.world_size}")
    w = LayerWorkload.from_config(mp, tokens=args.tokens, seq_len=args.seq_len,
                                  n_ep=cluster.world_size // esp, n_esp=esp, n_dp=1,
                                  bytes_per_element=perf.bytes_per_element)
    layers = args.layers or mp.num_layers
    return [w] * layers, perf, cluster, mp


def compare(args) -> dict:
    from moeflow.plan import baselines, fsmoe

    workloads, perf, cluster, mp = setup(args)
    fs = fsmoe.plan(workloads, perf, cluster, r_max=args.r_max, model=mp.name)
    others = [
        baselines.deepspeed_moe(workloads, perf, cluster, model=mp.name),
        baselines.tutel(workloads, perf, cluster, r=args.tutel_r, model=mp.name),
        baselines.pipemoe(workloads, perf, cluster, r_max=args.r_max, model=mp.name),
        baselines.lina(workloads, perf, cluster, chunk_bytes=args.lina_chunk_mb * 2**20,
                       r_max=args.r_max, model=mp.name),
    ]
    rows = []
    for p in [fs, *others]:
        degs = sorted(set(p.degrees()))
        rows.append({"method": p.method, "degrees": degs,
                     "step_ms": p.predicted_step_ms,
                     "fsmoe_speedup": p.predicted_step_ms / fs.predicted_step_ms,
                     "tail_ar_MB": p.tail_ar_bytes / 1e6,
                     "solve_ms": p.solve_ms})
    return {"model": mp.name, "cluster": cluster.name, "nodes": cluster.nodes,
            "gpus_per_node": cluster.gpus_per_node, "tokens_per_gpu": args.tokens,
            "n_ep": workloads[0].n_ep, "n_esp": workloads[0].n_esp, "layers": len(workloads),
            "perf": perf.name, "rows": rows, "plan": fs}


def run_plan(args) -> int:
    try:
        res = compare(args)
    except MoeflowError as e:
        print(f"moeflow plan: error: {e}", file=sys.stderr)
        return 2
    fs = res.pop("plan")
    if args.out:
        fs.save(args.out)
    if args.json:
        res["fsmoe_plan"] = fs.to_dict()
        print(json.dumps(res, indent=2))
        return 0
    print(f"model {res['model']} on {res['cluster']} ({res['nodes']} x {res['gpus_per_node']} "
          f"GPUs, N_EP={res['n_ep']}, N_ESP={res['n_esp']}), {res['tokens_per_gpu']} tokens/GPU, "
          f"{res['layers']} MoE layers, costs: {res['perf']}")
    print(f"{'method':<16} {'(r_fwd, r_bwd)':<22} {'step (ms)':>12} {'FSMoE speedup':>14} "
          f"{'tail AR (MB)':>13}")
    for row in res["rows"]:
        degs = ", ".join(f"({a},{b})" for a, b in row["degrees"][:3])
        if len(row["degrees"]) > 3:
            degs += ", ..."
        print(f"{row['method']:<16} {degs:<22} {row['step_ms']:>12.2f} "
              f"{row['fsmoe_speedup']:>13.3f}x {row['tail_ar_MB']:>13.1f}")
    print(f"FSMoE solve time: {fs.solve_ms:.1f} ms for {len(fs.layers)} layers")
    if args.out:
        print(f"plan written to {args.out}")
    return 0


add_arguments = add_plan_arguments
run = run_plan
