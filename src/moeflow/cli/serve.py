"""``moeflow serve``: an OpenAI-compatible HTTP server for a transformers MoE checkpoint,
with continuous batching (:mod:`moeflow.serving.engine`, :mod:`moeflow.serving.openai_api`;
needs the ``[serve]`` extra). Colocated on one process, or disaggregated with ``--ag N --eg
M``: N attention ranks and M expert ranks, each loading only its part of the checkpoint
(:mod:`moeflow.serving.disagg_server`): gloo ranks on the CPU, or with ``--device cuda`` NCCL
ranks, rank ``r`` on GPU ``r`` (one GPU per rank; a solved schedule then needs ``--costs`` or
``--perf``).

    moeflow serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]
        [--block-size 16] [--kv-cache-gib G | --num-blocks N] [--max-seqs 32]
        [--max-prefill-tokens 512] [--dtype float32|bfloat16|float16] [--device cpu|cuda]
        [--ag N --eg M [--schedule findep|pppipe|naive] [--costs FILE | --perf FILE] [--r1 R]
         [--refit-every 64] [--timeout-s 30] [--threads 1]]

With ``--ag``/``--eg`` the KV cache flags apply to each attention rank. ``--schedule``
(default findep): every forward step's ``(r1, r2, order)`` is solved for that step's mix of
sequences and new tokens (prefill chunks and decodes) by FinDEP's step solver
(:class:`moeflow.plan.findep.StepPlanner`), from this host's costs, measured by the ranks at
start (:mod:`moeflow.serving.host_costs`), read from ``--costs FILE`` (the JSON of
``/health``'s ``costs``) or from ``--perf FILE`` (a ``moeflow profile`` PerfModel; a cost it
lacks is refused by name); pppipe gets its best ``r1`` from the same solver (or ``--r1``),
naive runs ``r1 = r2 = 1``. ``--refit-every K`` (default 64; 0: never): every attention rank
refits those costs to the steps it has served (the last 256) after every ``K`` steps
(:meth:`moeflow.plan.findep.StepPlanner.refit`), and prices steps serially where split steps
ran as if nothing overlapped. ``/health`` lists every step shape served and its plan,
measured and predicted, the costs in use, whether serial, and the refits.

SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish, then
exits (143 after SIGTERM, 130 after Ctrl-C, as every moeflow command).
"""

from __future__ import annotations

import argparse
import socket

_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR", help="transformers checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (default 8000; 0: any)")
    p.add_argument(
        "--served-model-name", default=None, help="the model id clients name (default: dir name)"
    )
    p.add_argument("--block-size", type=int, default=16, help="token positions per KV block")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--kv-cache-gib", type=float, default=None, help="KV cache memory budget")
    g.add_argument("--num-blocks", type=int, default=None, help="KV blocks in the pool")
    p.add_argument("--max-seqs", type=int, default=32, help="requests running at once")
    p.add_argument(
        "--max-prefill-tokens", type=int, default=512, help="prompt tokens prefilled per step"
    )
    p.add_argument("--dtype", default="float32", choices=_DTYPES, help="weights and KV dtype")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    d = p.add_argument_group(
        "disaggregated serving (attention and expert ranks: gloo on CPU, NCCL with --device cuda)"
    )
    d.add_argument("--ag", type=int, default=None, help="attention ranks (default 1 with --eg)")
    d.add_argument("--eg", type=int, default=None, help="expert ranks; must divide the experts")
    d.add_argument(
        "--schedule",
        default="findep",
        choices=["findep", "pppipe", "naive"],
        help="findep (default): (r1, r2, order) solved per step from this host's costs; "
        "pppipe: its best r1 per step; naive: r1 = r2 = 1",
    )
    d.add_argument(
        "--costs",
        default=None,
        metavar="FILE",
        help="the step solver's costs as JSON (gemm, link, attention, head: alpha_ms, "
        "beta_ms; as /health reports them) instead of measuring them at start",
    )
    d.add_argument(
        "--perf",
        default=None,
        metavar="FILE",
        help="the step solver's costs from a `moeflow profile` PerfModel file "
        "(plan.findep.StepPlanner.from_perf) instead of measuring them at start",
    )
    d.add_argument(
        "--r1", type=int, default=None, help="pppipe: fixed micro-batches instead of solved"
    )
    d.add_argument(
        "--refit-every",
        type=int,
        default=None,
        metavar="K",
        help="refit the step solver's costs to the served steps every K steps (default 64; "
        "0: never)",
    )
    d.add_argument(
        "--timeout-s", type=float, default=30.0, help="deadline of every AG<->EG transfer"
    )
    d.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    d.add_argument("--force-nproc", action="store_true", help="allow more ranks than 4 per CPU")


def run(args, engine_kw: dict | None = None) -> int:
    """Serve until SIGTERM or Ctrl-C. ``engine_kw``: extra keywords of
    :class:`~moeflow.serving.disagg_server.DisaggregatedEngine` with ``--ag``/``--eg`` (a
    caller's ``rank_init`` and ``master_addr``; the command line gives none)."""
    from moeflow._deps import require
    from moeflow.errors import ConfigError

    uvicorn = require("uvicorn", "moeflow serve")
    require("fastapi", "moeflow serve")
    import torch

    from moeflow.serving.engine import EngineConfig
    from moeflow.serving.openai_api import build_app, from_pretrained

    if not 0 <= args.port <= 65535:
        raise ConfigError("--port", args.port, "an int in [0, 65535]")
    kv_bytes = None
    if args.kv_cache_gib is not None:
        if not args.kv_cache_gib > 0:
            raise ConfigError("--kv-cache-gib", args.kv_cache_gib, "a number > 0")
        kv_bytes = int(args.kv_cache_gib * 2**30)
    cfg = EngineConfig(
        block_size=args.block_size,
        num_blocks=args.num_blocks,
        kv_cache_bytes=kv_bytes,
        max_seqs=args.max_seqs,
        max_prefill_tokens=args.max_prefill_tokens,
    )
    cfg.check()
    disaggregated = args.ag is not None or args.eg is not None
    if disaggregated:
        if args.eg is None:
            raise ConfigError("--eg", None, "the number of expert ranks, given with --ag")
        if args.device not in ("cpu", "cuda"):
            raise ConfigError(
                "--device",
                args.device,
                "cpu (gloo ranks) or cuda (NCCL, a GPU per rank) with --ag/--eg",
            )
    elif args.refit_every is not None:
        raise ConfigError("--refit-every", args.refit_every, "given only with --ag/--eg")
    # bind before loading the model: a taken port is one OSError line (exit 1), at once
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    dtype = getattr(torch, args.dtype)
    try:
        if disaggregated:
            server = _disaggregated(args, cfg, dtype, sock, engine_kw or {})
            where = f"{args.ag or 1} attention + {args.eg} expert ranks, "
            blocks = server.engine.num_blocks
        else:
            server = from_pretrained(
                args.model_dir, cfg, args.served_model_name, dtype, args.device
            )
            where, blocks = "", server.engine.cache.pool.num_blocks
    except BaseException:
        sock.close()
        raise
    print(
        f"moeflow serve: {server.model_name} on http://{args.host}:{port} "
        f"({where}{blocks} KV blocks of {cfg.block_size} positions"
        f"{' per attention rank' if disaggregated else ''}, context {server.engine.context})",
        flush=True,
    )
    app = build_app(server)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on")
    # uvicorn's shutdown on SIGTERM/SIGINT: stop accepting, wait for the responses in
    # flight, then the app's lifespan drains the engine; the signal is re-raised after.
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        if disaggregated:  # ends the ranks if the lifespan did not (a no-op if it did)
            server.engine.shutdown(drain=False)
    return 0


def _disaggregated(args, cfg, dtype, sock, engine_kw: dict):
    from moeflow.errors import ConfigError
    from moeflow.serving.disagg_server import disaggregated_server
    from moeflow.serving.disaggregated import ServeSchedule
    from moeflow.serving.host_costs import load_costs
    from moeflow.validate import positive_int

    schedule = args.schedule
    if args.r1 is not None:
        if schedule != "pppipe":
            raise ConfigError("--r1", args.r1, "given only with --schedule pppipe")
        schedule = ServeSchedule.pppipe(positive_int("--r1", args.r1))
    costs = perf = None
    for flag, value in (("--costs", args.costs), ("--perf", args.perf)):
        if value is not None and (args.schedule == "naive" or args.r1 is not None):
            raise ConfigError(flag, value, "given only with a solved schedule")
    if args.costs is not None and args.perf is not None:
        raise ConfigError("--costs/--perf", "both", "one of them")
    refit_every = 64 if args.refit_every is None else args.refit_every
    if refit_every < 0:
        raise ConfigError("--refit-every", refit_every, "an int >= 0 (0: never refit)")
    if args.refit_every is not None and (args.schedule == "naive" or args.r1 is not None):
        raise ConfigError("--refit-every", args.refit_every, "given only with a solved schedule")
    if args.costs is not None:
        costs = load_costs(args.costs)
    if args.perf is not None:
        from moeflow.perf import PerfModel
        from moeflow.plan.io import MAX_JSON_BYTES
        from moeflow.validate import read_json_file

        perf = PerfModel.from_dict(read_json_file(args.perf, "--perf", MAX_JSON_BYTES))
    return disaggregated_server(
        args.model_dir,
        cfg,
        args.served_model_name,
        ag=1 if args.ag is None else args.ag,
        eg=args.eg,
        dtype=dtype,
        schedule=schedule,
        costs=costs,
        perf=perf,
        timeout_s=args.timeout_s,
        threads=args.threads,
        device=args.device,
        force=args.force_nproc,
        close_fds=[sock.fileno()],
        refit_every=refit_every,
        **engine_kw,
    )
