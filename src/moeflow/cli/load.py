"""``moeflow load``: drive an OpenAI-compatible server with Poisson-arrival streaming requests
and report throughput, TTFT, TPOT, ITL and goodput (:mod:`moeflow.apps.loadgen`; needs httpx,
the ``[serve]`` extra).

    moeflow load --url http://HOST:PORT --model NAME [--rate R|inf] [--requests N]
        [--input-len A] [--output-len B] [--seed S] [--vocab-size V | --prompt-text]
        [--no-ignore-eos] [--slo-ttft-ms X --slo-tpot-ms Y] [--timeout SECONDS]
        [--json OUT.json [--force]]

Every flag is checked before the first request (a bad one exits 2); a server that does not
answer is one error line (exit 1).
"""

from __future__ import annotations

import argparse
import json
import math


def _rate(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'inf'") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="the model id to request")
    p.add_argument("--rate", type=_rate, default=math.inf, help="requests/s (Poisson) or inf")
    p.add_argument("--requests", type=int, default=100, help="requests to send (default 100)")
    p.add_argument("--input-len", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request")
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals and prompts")
    p.add_argument(
        "--vocab-size", type=int, default=256, help="prompt token ids are drawn from [0, V)"
    )
    p.add_argument(
        "--prompt-text",
        action="store_true",
        help="send prompts as text of --input-len letters (for servers that take no token ids)",
    )
    p.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="do not send vLLM's ignore_eos (for servers that reject it; output lengths then "
        "hold only while the model emits no EOS, the report counts what came)",
    )
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="goodput SLO on TTFT")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="goodput SLO on TPOT")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout (s)")
    p.add_argument("--json", default=None, metavar="OUT", help="also write the report as JSON")
    p.add_argument("--force", action="store_true", help="replace an existing --json file")


def run(args) -> int:
    from moeflow._deps import require

    require("httpx", "moeflow load")
    from moeflow.apps.loadgen import LoadConfig, LoadFailedError, format_report, run_load
    from moeflow.files import atomic_file, check_output

    cfg = LoadConfig(
        url=args.url,
        model=args.model,
        rate=args.rate,
        requests=args.requests,
        input_len=args.input_len,
        output_len=args.output_len,
        seed=args.seed,
        vocab_size=args.vocab_size,
        prompt_text=args.prompt_text,
        ignore_eos=not args.no_ignore_eos,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        timeout_s=args.timeout,
    )
    cfg.check()
    out = check_output("--json", args.json, force=args.force)
    report = run_load(cfg)
    print(format_report(report), flush=True)
    if out is not None:
        with atomic_file(out, force=args.force) as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    if not report["completed"]:
        raise LoadFailedError(f"no request completed: {report['errors'][0]}")
    return 0
