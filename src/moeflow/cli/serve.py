"""``moeflow serve``: an OpenAI-compatible HTTP server for a transformers MoE checkpoint,
colocated on one process, with continuous batching (:mod:`moeflow.serving.engine`,
:mod:`moeflow.serving.openai_api`; needs the ``[serve]`` extra).

    moeflow serve MODEL_DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME]
        [--block-size 16] [--kv-cache-gib G | --num-blocks N] [--max-seqs 32]
        [--max-prefill-tokens 512] [--dtype float32|bfloat16|float16] [--device cpu|cuda]

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


def run(args) -> int:
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
    server = from_pretrained(
        args.model_dir, cfg, args.served_model_name, getattr(torch, args.dtype), args.device
    )
    pool = server.engine.cache.pool
    print(
        f"moeflow serve: {server.model_name} on http://{args.host}:{port} "
        f"({pool.num_blocks} KV blocks of {cfg.block_size} positions, "
        f"context {server.engine.context})",
        flush=True,
    )
    app = build_app(server)
    config = uvicorn.Config(app, log_level=args.log_level, lifespan="on")
    # uvicorn's shutdown on SIGTERM/SIGINT: stop accepting, wait for the responses in
    # flight, then the app's lifespan drains the engine; the signal is re-raised after.
    uvicorn.Server(config).run(sockets=[sock])
    return 0
