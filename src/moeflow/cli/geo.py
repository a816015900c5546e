"""``moeflow geo``: plan and run pipeline training over slow, uneven links (FusionLLM).

    moeflow geo plan --devices sites.json [--adatopk] [--out plan.json]
    moeflow geo plan --perf perf.json --memory-gb 16     # the ranks `moeflow profile` measured
    moeflow geo train --plan plan.json --steps 30 [--backups 1 --checkpoint-every 5 ...]
    moeflow geo train --stages 2 --steps 30 --compare      # also the single-process curve
    moeflow geo train --mode diloco --replicas 2 --inner-steps 10 --steps 30
    moeflow geo train --mode pipeline-diloco --devices sites.json --inner-steps 10 --steps 30

``plan`` traces the model (``torch.fx``), partitions its operator graph over the devices of
the file (:mod:`moeflow.plan.geo`) and prints the stages, their times and the AdaTopK density
of each link. ``train`` runs that plan as a pipeline of local gloo ranks (one per stage, plus
``--backups`` spare ranks that replace a rank that leaves); under ``torchrun`` each process is
one rank and the agent's store is the broker. ``train --mode diloco`` runs data-parallel
replicas instead (one gloo rank each; ``--replicas N`` or one per site of ``--devices``) that
all-reduce once every ``--inner-steps`` steps (DiLoCo, :mod:`moeflow.geo.diloco`);
``--mode dp`` is the plain data-parallel baseline (gradients all-reduced every step).
``train --mode diloco`` with ``--backups``, ``--max-replicas`` or ``--kill`` lets replicas
change at an outer step (:mod:`moeflow.geo.elastic`): spares replace a replica that leaves,
and a device started with ``--join HOST:PORT`` (the broker address the job prints) becomes a
replica or a spare at the next outer step. ``train --mode pipeline-diloco`` runs a pipeline
of ``--stages`` ranks in each site (one per device of the site with ``--devices``) and DiLoCo
between the sites (:mod:`moeflow.geo.diloco`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from moeflow.errors import ConfigError, InputError, PlanError
from moeflow.files import atomic_file, check_output

#: the lowest AdaTopK density ``plan`` uses by default. With the backward sending the gradient
#: at the forward's positions, the demo model's 300-step loss ends within 2% of exact links at
#: 0.25 and at 0.1 on a mid-model cut (notes/REJECTED.md, record geo_adatopk_cut_*); 0.25 is
#: the density the geo_train record's AdaTopK arm uses on its cross-site links
MIN_DENSITY = 0.25
#: the most pipeline stages (devices) a plan may have
MAX_STAGES = 64


def _model_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and batch")
    g.add_argument("--model", choices=("demo", "gpt2"), default="demo")
    g.add_argument("--dim", type=int, default=64)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--seq-len", type=int, default=64)
    g.add_argument("--experts", type=int, default=4, help="demo model only")
    g.add_argument("--microbatch-size", type=int, default=4)
    g.add_argument("--microbatches", type=int, default=4)


#: the model and batch flags and their upper limits (those of :class:`GeoJob`'s fields)
_SIZE_FLAGS = (
    ("--dim", "dim"),
    ("--layers", "layers"),
    ("--heads", "heads"),
    ("--seq-len", "seq_len"),
    ("--experts", "experts"),
    ("--microbatch-size", "microbatch_size"),
    ("--microbatches", "microbatches"),
)


def validate_model_args(args) -> None:
    """The model and batch flags, bounded, before anything is built: ConfigError naming the
    flag and its allowed range."""
    from moeflow.geo.pipeline import MAX_SIZES
    from moeflow.validate import positive_int

    for flag, attr in _SIZE_FLAGS:
        setattr(args, attr, positive_int(flag, getattr(args, attr), maximum=MAX_SIZES[attr]))


def _force(p: argparse.ArgumentParser, flag: str) -> None:
    p.add_argument(
        "--force", action="store_true", help=f"replace an existing {flag} file (never an input)"
    )


def add_geo_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="geo_command", metavar="{plan,train}", required=True)
    pl = sub.add_parser("plan", help="partition the model's operator graph over a device file")
    pl.add_argument("--devices", help="device graph JSON (moeflow.plan.geo)")
    pl.add_argument(
        "--perf",
        help="instead of --devices: a `moeflow profile` PerfModel JSON; one device per "
        "profiled rank (moeflow.plan.geo.device_graph_from_perf)",
    )
    pl.add_argument(
        "--memory-gb",
        type=float,
        default=16.0,
        help="memory of each device with --perf (GB; default %(default)s)",
    )
    pl.add_argument("--adatopk", action="store_true", help="sparsify the links the plan marks slow")
    pl.add_argument(
        "--min-density",
        type=float,
        default=MIN_DENSITY,
        help="lowest AdaTopK density the plan may use (default: %(default)s)",
    )
    pl.add_argument(
        "--out", help="write the plan as JSON here (refused if it exists, unless --force)"
    )
    _force(pl, "--out")
    _model_arguments(pl)
    tr = sub.add_parser("train", help="run a plan as a pipeline of gloo ranks (or DiLoCo)")
    tr.add_argument(
        "--mode",
        choices=("pipeline", "diloco", "dp", "pipeline-diloco"),
        default="pipeline",
        help="pipeline (default); diloco: replicas synchronised every --inner-steps; "
        "dp: plain data parallel (gradients all-reduced every step); pipeline-diloco: a "
        "pipeline of --stages ranks per site, DiLoCo between the sites",
    )
    dl = tr.add_argument_group("diloco, dp and pipeline-diloco (--mode diloco|dp|pipeline-diloco)")
    reps = dl.add_mutually_exclusive_group()
    reps.add_argument("--replicas", type=int, help="data-parallel replicas, one rank each (2)")
    reps.add_argument(
        "--devices",
        help="device graph JSON: one replica per site (pipeline-diloco: a stage per device "
        "of the smallest site unless --stages)",
    )
    dl.add_argument(
        "--inner-steps", type=int, help="H: AdamW steps between outer steps (diloco; 10)"
    )
    dl.add_argument("--outer-lr", type=float, help="outer Nesterov SGD lr (diloco; 0.7)")
    dl.add_argument("--outer-momentum", type=float, help="outer momentum in [0, 1) (diloco; 0.9)")
    dl.add_argument(
        "--max-replicas",
        type=int,
        help="diloco: devices that join become replicas up to this many, then spares",
    )
    dl.add_argument(
        "--join",
        metavar="HOST:PORT",
        help="diloco: join the running job whose broker is at HOST:PORT (printed by it) with "
        "the same flags, from its next outer step on",
    )
    dl.add_argument("--join-id", type=int, help="with --join: this device's id, unique in the job")
    src = tr.add_mutually_exclusive_group()
    src.add_argument("--plan", help="a plan written by 'moeflow geo plan --out'")
    src.add_argument("--stages", type=int, help="even split into this many stages (no plan)")
    tr.add_argument("--steps", type=int, default=30)
    tr.add_argument("--lr", type=float, default=3e-3)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--backups", type=int, default=0, help="spare ranks in the backup pool")
    tr.add_argument("--checkpoint-dir")
    tr.add_argument("--checkpoint-every", type=int, default=0)
    tr.add_argument("--resume", action="store_true", help="start from --checkpoint-dir's latest")
    tr.add_argument(
        "--kill",
        metavar="STAGE:STEP",
        help="fault injection: the rank holding STAGE dies during STEP",
    )
    tr.add_argument("--compare", action="store_true", help="also print the 1-process curve")
    tr.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    tr.add_argument("--force-nproc", action="store_true", help="allow more ranks than CPUs x4")
    tr.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds any one transfer or rank may stall before the run ends (120)",
    )
    tr.add_argument(
        "--json",
        dest="json_out",
        help="write losses, times and events here (refused if it exists, unless --force)",
    )
    _force(tr, "--json")
    _model_arguments(tr)


def _job_kwargs(args) -> dict:
    return dict(
        model=args.model,
        dim=args.dim,
        layers=args.layers,
        heads=args.heads,
        seq_len=args.seq_len,
        experts=args.experts,
        microbatch_size=args.microbatch_size,
        microbatches=args.microbatches,
    )


def run_geo(args: argparse.Namespace) -> int:
    if args.geo_command == "plan":
        return _plan(args)
    return _train(args)


def _plan(args) -> int:
    from moeflow.geo.pipeline import GeoJob, trace_job
    from moeflow.plan import geo as pgeo

    validate_model_args(args)
    if not 0 < args.min_density <= 1:
        raise ConfigError("--min-density", args.min_density, "a density in (0, 1]")
    if (args.devices is None) == (args.perf is None):
        raise ConfigError("--devices/--perf", (args.devices, args.perf), "exactly one of them")
    source = args.devices or args.perf
    check_output("--out", args.out, inputs=[source], force=args.force)
    perf = None
    if args.perf is not None:
        from moeflow.perf import PerfModel
        from moeflow.plan.io import MAX_JSON_BYTES
        from moeflow.validate import positive_float, read_json_file

        positive_float("--memory-gb", args.memory_gb)
        perf = PerfModel.from_dict(read_json_file(args.perf, "--perf", MAX_JSON_BYTES))
        count = int(perf.meta.get("world_size", 2))
    else:
        graph = pgeo.DeviceGraph.load(args.devices)
        count = len(graph.devices)
    if count > MAX_STAGES:
        raise ConfigError(
            "--perf" if perf is not None else "--devices",
            f"{count} devices",
            f"at most {MAX_STAGES} devices (one pipeline stage each)",
        )
    job = GeoJob(stages=max(2, count), **_job_kwargs(args))
    # GPT-2 has no data-dependent node: plan it from a meta build (no weights to initialise)
    _, traced = trace_job(job, device="meta" if job.model == "gpt2" else "cpu")
    if perf is not None:  # rates on this graph and links, from the profile; a missing cost
        # is a ConfigError naming it
        graph = pgeo.device_graph_from_perf(perf, traced.ops, memory_bytes=args.memory_gb * 1e9)
    plan = pgeo.partition(
        traced.ops,
        graph,
        microbatches=job.microbatches,
        adatopk=args.adatopk,
        min_density=args.min_density,
    )
    names = [d.name for d in graph.devices]
    print(f"{len(traced.ops.nodes)} graph nodes over {len(names)} devices")
    for s, (dev, t) in enumerate(zip(plan.devices, plan.stage_times, strict=True)):
        a, b = plan.bounds[s], plan.bounds[s + 1]
        link = ""
        if s < len(plan.devices) - 1:
            d = plan.densities[s]
            cut = traced.ops.cut_bytes(b) / 1e6
            link = f"  -> {cut:.2f} MB cut" + (f", AdaTopK density {d:.3f}" if d < 1 else "")
        print(f"stage {s} on {names[dev]:<10} nodes [{a},{b})  {t * 1e3:9.2f} ms{link}")
    baselines = _baselines(pgeo, traced.ops, graph, job.microbatches, plan.step_time_s)
    parts = []
    for name, b in baselines.items():
        if "step_time_s" in b:
            parts.append(f"{name} {b['step_time_s'] * 1e3:.1f} ms ({b['slowdown']:.2f}x)")
        else:
            parts.append(f"{name} does not fit")
    print(f"step (model): {plan.step_time_s * 1e3:.1f} ms; " + "; ".join(parts))
    for name, b in baselines.items():
        if "error" in b:
            print(f"baseline {name} does not fit: {b['error']}")
    if args.out:
        doc = {
            "plan": plan.to_dict(),
            "job": _job_kwargs(args),
            "devices": names,
            "baselines": baselines,
        }
        with atomic_file(args.out, force=args.force) as f:
            json.dump(doc, f, indent=1)
        print(f"wrote {args.out}")
    return 0


def _baselines(pgeo, ops, graph, microbatches: int, step_s: float) -> dict:
    """The even layer split and data parallelism over the same devices: each one's model step
    and its ratio to the plan's, or why it cannot run (a stage or replica that does not fit a
    device's memory, consecutive devices without a link)."""
    out = {}
    for name, fn in (
        ("even split", lambda: pgeo.even_split(ops, graph, microbatches=microbatches).step_time_s),
        ("data parallel", lambda: pgeo.data_parallel_step_s(ops, graph, microbatches=microbatches)),
    ):
        try:
            t = fn()
        except PlanError as e:
            out[name] = {"fits": False, "error": str(e)}
        else:
            out[name] = {"fits": True, "step_time_s": t, "slowdown": t / step_s}
    return out


def job_from_args(args) -> object:
    from moeflow.geo.pipeline import GeoJob

    validate_model_args(args)
    kw = _job_kwargs(args)
    bounds = densities = None
    stages = 2 if args.stages is None else args.stages
    if stages < 2:
        raise ConfigError("--stages", stages, "an int >= 2 (a pipeline)")
    if args.checkpoint_dir is not None and (
        os.path.exists(args.checkpoint_dir) and not os.path.isdir(args.checkpoint_dir)
    ):
        raise InputError(f"--checkpoint-dir {args.checkpoint_dir!r} is a file, not a directory")
    if args.plan:
        try:
            with open(args.plan, "rb") as f:
                doc = json.loads(f.read().decode("utf-8"))
            bounds = tuple(int(b) for b in doc["plan"]["bounds"])
            densities = tuple(float(d) for d in doc["plan"]["densities"])
            job_kw = doc.get("job", {})
            if not isinstance(job_kw, dict) or set(job_kw) - set(kw):
                raise ValueError(f"'job' must be an object with keys from {sorted(kw)}")
            kw.update(job_kw)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(
                "--plan", args.plan, f"a plan from 'moeflow geo plan' ({e})"
            ) from None
    kill = None
    if args.kill:
        try:
            s, k = (int(x) for x in args.kill.split(":"))
        except ValueError:
            raise ConfigError("--kill", args.kill, "STAGE:STEP, two integers") from None
        kill = (s, k)
    try:
        return GeoJob(
            **kw,
            bounds=bounds,
            densities=densities,
            stages=stages,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            backups=args.backups,
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
            kill=kill,
            threads=args.threads,
            timeout_s=args.timeout,
        )
    except ConfigError as e:  # name the flag (or the --plan file) the field came from
        names = e.field.split("/")
        if args.plan and any(n in ("bounds", "densities", "stages") for n in names):
            raise ConfigError(f"--plan {args.plan!r}: {e.field}", e.value, e.allowed) from None
        flag = "/".join(
            "--" + ("timeout" if n == "timeout_s" else n).replace("_", "-") for n in names
        )
        raise ConfigError(flag, e.value, e.allowed) from None


#: pipeline-only flags and their defaults (given with --mode diloco|dp: ConfigError)
_PIPELINE_ONLY = (
    ("--plan", "plan", None),
    ("--stages", "stages", None),
    ("--backups", "backups", 0),
    ("--checkpoint-dir", "checkpoint_dir", None),
    ("--checkpoint-every", "checkpoint_every", 0),
    ("--resume", "resume", False),
    ("--kill", "kill", None),
    ("--compare", "compare", False),
)
_DILOCO_ONLY = (
    ("--inner-steps", "inner_steps"),
    ("--outer-lr", "outer_lr"),
    ("--outer-momentum", "outer_momentum"),
)


def diloco_job_from_args(args) -> object:
    """The :class:`moeflow.geo.diloco.DilocoJob` of ``--mode diloco|dp``; every flag checked
    (ConfigError naming it) before anything is forked."""
    from moeflow.geo import diloco

    hybrid = args.mode == "pipeline-diloco"
    for flag, attr, default in _PIPELINE_ONLY:
        if hybrid and attr == "stages":
            continue
        if args.mode == "diloco" and attr in (
            "checkpoint_dir",
            "checkpoint_every",
            "resume",
            "backups",
            "kill",
        ):
            continue
        if getattr(args, attr) != default:
            raise ConfigError(flag, getattr(args, attr), f"absent with --mode {args.mode}")
    if args.mode == "dp":
        for flag, attr in _DILOCO_ONLY:
            if getattr(args, attr) is not None:
                raise ConfigError(flag, getattr(args, attr), "absent with --mode dp")
    validate_model_args(args)
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    stages = args.stages if hybrid and args.stages is not None else 1
    if args.devices is not None:
        sites = diloco.sites_from_devices(args.devices)
        replicas = len(sites)
        if hybrid and args.stages is None:
            stages = min(sites)
    elif args.replicas is not None:
        replicas = args.replicas
    else:  # one replica per torchrun rank (per `stages` ranks), else two local replicas
        replicas = max(1, int(os.environ["WORLD_SIZE"]) // stages) if under_torchrun else 2
    kw = {"stages": stages} if hybrid else {}
    if args.mode == "diloco":
        kw.update(
            checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every,
            resume=args.resume,
        )
    for _, attr in _DILOCO_ONLY:
        if getattr(args, attr) is not None:
            kw[attr] = getattr(args, attr)
    try:
        return diloco.DilocoJob(
            mode=args.mode,
            replicas=replicas,
            steps=args.steps,
            lr=args.lr,
            seed=args.seed,
            threads=args.threads,
            timeout_s=args.timeout,
            **_job_kwargs(args),
            **kw,
        )
    except ConfigError as e:  # name the flag the field came from
        names = e.field.split("/")
        if names == ["replicas"] and args.devices is not None:
            raise ConfigError(f"--devices {args.devices!r} sites", e.value, e.allowed) from None
        flag = "/".join(
            "--" + ("timeout" if n == "timeout_s" else n).replace("_", "-") for n in names
        )
        raise ConfigError(flag, e.value, e.allowed) from None


def elastic_job_from_args(args, job) -> object:
    """The :class:`moeflow.geo.elastic.ElasticJob` of ``--mode diloco`` with ``--backups``,
    ``--kill``, ``--max-replicas`` or ``--join`` (None without them)."""
    from moeflow.geo import elastic

    if not (args.backups or args.kill or args.max_replicas is not None or args.join):
        if args.join_id is not None:
            raise ConfigError("--join-id", args.join_id, "given with --join")
        return None
    if args.mode != "diloco":
        raise ConfigError("--backups/--kill/--max-replicas/--join", args.mode, "--mode diloco")
    kill = None
    if args.kill:
        try:
            kill = tuple(int(x) for x in args.kill.split(":"))
            if len(kill) != 2:
                raise ValueError
        except ValueError:
            raise ConfigError("--kill", args.kill, "SLOT:STEP, two integers") from None
    try:
        return elastic.ElasticJob(
            diloco=job, backups=args.backups, max_replicas=args.max_replicas, kill=kill
        )
    except ConfigError as e:
        flag = "--" + e.field.replace("_", "-")
        raise ConfigError(flag, e.value, e.allowed) from None


def _join_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError("--join", text, "HOST:PORT of a running job's broker")
    return host, int(port)


def _train_elastic(args, ejob) -> int:
    from torch.distributed import TCPStore

    from moeflow.geo import elastic
    from moeflow.launch import check_nproc

    if args.join:
        addr = _join_address(args.join)
        if args.join_id is None:
            raise ConfigError("--join-id", None, f"an int >= {ejob.world} with --join")
        elastic.join(addr, args.join_id, ejob)
        print(f"device {args.join_id}: the job ended")
        return 0
    check_nproc(ejob.world, force=args.force_nproc)
    store = TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    print(
        f"broker at 127.0.0.1:{store.port}: a device joins with 'moeflow geo train --mode "
        f"diloco --join 127.0.0.1:{store.port} --join-id N' and this job's flags "
        f"(N >= {ejob.world})",
        flush=True,
    )
    result = elastic.train(ejob, force=args.force_nproc, store=store)
    steps = ejob.diloco.steps
    for k, loss in enumerate(result.losses):
        if k % max(1, steps // 10) == 0 or k == steps - 1:
            print(f"step {k:4d}  loss {loss:.4f}  replicas {result.replicas[k]}")
    for e in result.events:
        print(e)
    if args.json_out:
        doc = {
            "job": ejob.diloco.to_dict(),
            "backups": ejob.backups,
            "max_replicas": ejob.max_replicas,
            "losses": result.losses,
            "replicas": result.replicas,
            "events": result.events,
        }
        with atomic_file(args.json_out, force=args.force) as f:
            json.dump(doc, f, indent=1)
    return 0


def _train_replicas(args) -> int:
    from moeflow.geo import diloco
    from moeflow.launch import check_nproc

    job = diloco_job_from_args(args)
    ejob = elastic_job_from_args(args, job)
    check_output(
        "--json", args.json_out, inputs=[args.devices, args.checkpoint_dir], force=args.force
    )
    if job.resume:  # the checkpoint loads into this job, before any fork
        diloco.check_resume(job)
    if ejob is not None:
        return _train_elastic(args, ejob)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # one replica under torchrun
        result = diloco.run_torchrun(job)
        if result is None:  # rank 0 reports
            return 0
    else:
        check_nproc(job.world, force=args.force_nproc)
        result = diloco.train(job, force=args.force_nproc)
    for k, loss in enumerate(result.losses):
        if k % max(1, job.steps // 10) == 0 or k == job.steps - 1:
            print(f"step {k:4d}  loss {loss:.4f}  {result.step_times_s[k] * 1e3:8.1f} ms")
    syncs = len(result.allreduce_bytes)
    shape = f"{job.replicas} replicas" + (f" x {job.stages} stages" if job.stages > 1 else "")
    util = ", ".join(f"{u:.0%}" for u in result.utilization)
    print(
        f"{job.mode}: {shape}, {syncs} all-reduces of "
        f"{result.param_bytes / 1e6:.3f} MB (the parameters); "
        f"{result.bytes_per_inner_step / 1e6:.4f} MB per replica and inner step; "
        f"{result.tokens_per_s:.0f} tokens/s; compute utilization per rank {util}"
    )
    if args.json_out:
        doc = {
            "job": job.to_dict(),
            "losses": result.losses,
            "replica_losses": result.replica_losses,
            "step_times_s": result.step_times_s,
            "allreduce_s": result.allreduce_s,
            "allreduce_bytes": result.allreduce_bytes,
            "param_bytes": result.param_bytes,
            "bytes_per_inner_step": result.bytes_per_inner_step,
            "tokens_per_s": result.tokens_per_s,
            "elapsed_s": result.elapsed_s,
            "wall_s": result.wall_s,
            "busy_s": result.busy_s,
            "cpu_s": result.cpu_s,
            "utilization": result.utilization,
        }
        with atomic_file(args.json_out, force=args.force) as f:
            json.dump(doc, f, indent=1)
    return 0


def _train(args) -> int:
    from moeflow.geo import pipeline as geo

    if args.mode != "pipeline":
        return _train_replicas(args)
    for flag, attr in (
        ("--replicas", "replicas"),
        ("--devices", "devices"),
        ("--max-replicas", "max_replicas"),
        ("--join", "join"),
        ("--join-id", "join_id"),
        *_DILOCO_ONLY,
    ):
        if getattr(args, attr) is not None:
            raise ConfigError(flag, getattr(args, attr), "absent with --mode pipeline")
    job = job_from_args(args)
    check_output("--json", args.json_out, inputs=[args.plan, args.checkpoint_dir], force=args.force)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # one rank under torchrun
        out = geo.run_torchrun(job)
        if "losses" in out:  # this rank held the last stage at the end
            start = geo.latest_checkpoint(job.checkpoint_dir) + 1 if job.resume else 0
            result = geo.merge_results([out], out["losses"], job, start)
            _report(args, job, result, None)
        return 0
    from moeflow.launch import check_nproc

    check_nproc(job.stages + job.backups, force=args.force_nproc)
    try:  # the plan's bounds against the traced graph, before any fork
        geo.check_bounds(job)
    except ConfigError as e:
        if args.plan:
            raise ConfigError(f"--plan {args.plan!r}: {e.field}", e.value, e.allowed) from None
        raise ConfigError("--stages", job.stages, e.allowed) from None
    result = geo.train(job, force=args.force_nproc)
    ref = geo.reference_losses(job) if args.compare else None
    _report(args, job, result, ref)
    return 0


def _report(args, job, result, ref) -> None:
    for k, loss in enumerate(result.losses):
        if k % max(1, job.steps // 10) == 0 or k == job.steps - 1:
            line = f"step {k:4d}  loss {loss:.4f}  {result.step_times_s[k] * 1e3:8.1f} ms"
            if ref is not None:
                line += f"  (1 process: {ref[k]:.4f}, diff {abs(loss - ref[k]):.1e})"
            print(line)
    for e in result.events:
        print(e)
    mb = ", ".join(f"{b / 1e6:.2f}" for b in result.wire_bytes)
    print(f"bytes on each link (MB, both directions, all steps): {mb}")
    if result.wall_s:
        util = ", ".join(f"{u:.0%}" for u in result.utilization)
        print(f"compute utilization per stage (busy / wall): {util}")
    if ref is not None:
        worst = max(abs(a - b) for a, b in zip(result.losses, ref, strict=True))
        print(f"max |pipeline - 1 process| over {job.steps} steps: {worst:.2e}")
    if args.json_out:
        doc = {
            "job": job.to_dict(),
            "losses": result.losses,
            "step_times_s": result.step_times_s,
            "events": result.events,
            "wire_bytes": result.wire_bytes,
            "elapsed_s": result.elapsed_s,
            "busy_s": result.busy_s,
            "cpu_s": result.cpu_s,
            "wall_s": result.wall_s,
            "utilization": result.utilization,
            "reference_losses": ref,
        }
        with atomic_file(args.json_out, force=args.force) as f:
            json.dump(doc, f, indent=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="moeflow geo", description=__doc__.splitlines()[0])
    add_geo_arguments(p)
    return run_geo(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
