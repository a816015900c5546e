"""``moeflow serve`` vs ``transformers serve --continuous-batching`` over HTTP, on CPU.

    python benchmarks/serve_http_cpu.py [--repeat 3] [--rates 4,16,inf] [--out benchmarks/results]

One random-weight Qwen3-MoE checkpoint (hidden 256, 4 layers, 8 experts top-2, a 64-token
character-level tokenizer; built from a transformers config, saved to a temporary directory)
is served by each arm in its own process with ``--threads`` torch threads (OMP and MKL too),
float32 on CPU:

* ``moeflow``: ``moeflow serve DIR``;
* ``transformers``: ``transformers serve DIR --continuous-batching --device cpu``.

``moeflow load`` (:mod:`moeflow.apps.loadgen`, vLLM's ``benchmark_serving`` metrics) drives
each at every rate with the same seeded request set: text prompts of ``--input-len``
characters (= tokens; transformers' ``/v1/completions`` takes text only) and exactly
``--output-len`` generated tokens (moeflow: ``ignore_eos``; transformers has no such flag, so
the checkpoint's generation config has no EOS). A repeat starts one arm's server, warms it
with a few requests, runs the rates in a shuffled order, stops it, then does the same for the
other arm; the arm order is shuffled per repeat too, so the arms interleave. Reports the
median and spread (min-max) over repeats of output tokens/s and p99 TPOT.

Writes ``serve_http_cpu_<host>_<date>.md`` and ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import cpu_name, stop_server, wait_for_server  # noqa: E402

from moeflow.apps.loadgen import LoadConfig, run_load  # noqa: E402

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 \n.,!?:;'-()[]{}/\"@#$%&*"


def make_checkpoint(path: str) -> None:
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>"
    ).save_pretrained(path)
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=len(vocab),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=1024,
        moe_intermediate_size=256,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        eos_token_id=None,  # no EOS: transformers serve then always generates max_tokens
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_cmd(arm: str, ckpt: str, port: int) -> list[str]:
    if arm == "moeflow":
        return [sys.executable, "-m", "moeflow.cli", "serve", ckpt, "--port", str(port)]
    exe = os.path.join(os.path.dirname(sys.executable), "transformers")
    # host and port are appended by start()
    return [exe, "serve", ckpt, "--continuous-batching", "--device", "cpu", "--dtype", "float32"]


def start(arm: str, ckpt: str, threads: int, log, extra_path: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = server_cmd(arm, ckpt, port)
    if arm == "transformers":
        cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    else:
        cmd += ["--log-level", "warning"]
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TORCH_NUM_THREADS"):
        env[k] = str(threads)
    if arm == "transformers" and extra_path:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_for_server(proc, url + "/v1/models", arm, 180)
    return proc, url


def stop(proc: subprocess.Popen) -> None:
    stop_server(proc, 30)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rates", default="4,16,inf")
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arms", default="moeflow,transformers")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--tf-pythonpath",
        default="",
        help="prepended to PYTHONPATH of the transformers arm only (e.g. a pip --target "
        "directory holding `openai`, which `transformers serve` requires)",
    )
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    rates = [float(r) for r in args.rates.split(",")]
    arms = args.arms.split(",")
    order_rng = random.Random(args.seed)
    tmp = tempfile.mkdtemp(prefix="serve_http_")
    ckpt = os.path.join(tmp, "qwen3moe-tiny")
    os.makedirs(ckpt)
    make_checkpoint(ckpt)
    runs: list[dict] = []
    failures: dict[str, str] = {}
    try:
        for rep in range(args.repeat):
            for arm in order_rng.sample(arms, len(arms)):
                if arm in failures:
                    continue
                with open(os.path.join(tmp, f"{arm}.log"), "ab") as log:
                    try:
                        proc, url = start(arm, ckpt, args.threads, log, args.tf_pythonpath)
                    except RuntimeError as e:
                        log.flush()
                        with open(os.path.join(tmp, f"{arm}.log"), errors="replace") as f:
                            tail = f.read()[-1500:]
                        failures[arm] = f"{e}\n{tail}"
                        print(f"{arm}: {e}", flush=True)
                        continue
                    model = "qwen3moe-tiny" if arm == "moeflow" else ckpt
                    try:
                        base = dict(
                            url=url,
                            model=model,
                            input_len=args.input_len,
                            output_len=args.output_len,
                            prompt_text=True,
                            ignore_eos=arm == "moeflow",  # transformers rejects the field
                        )
                        warm = run_load(LoadConfig(**base, requests=4, seed=999))
                        if warm["completed"] != 4:
                            failures[arm] = f"warm-up failed: {warm['errors']}"
                            print(f"{arm}: {failures[arm]}", flush=True)
                            continue
                        for rate in order_rng.sample(rates, len(rates)):
                            r = run_load(
                                LoadConfig(
                                    **base, rate=rate, requests=args.requests, seed=args.seed
                                )
                            )
                            r.pop("requests")
                            r["config"]["model"] = os.path.basename(r["config"]["model"])
                            row = {"arm": arm, "repeat": rep, "rate": rate, "report": r}
                            runs.append(row)
                            print(
                                f"rep {rep} {arm:>12} rate {rate:>5}: "
                                f"{r['output_throughput']:8.1f} tok/s, p99 TPOT "
                                f"{r['tpot_ms']['p99']:.1f} ms, p99 TTFT "
                                f"{r['ttft_ms']['p99']:.1f} ms, done {r['completed']}/"
                                f"{args.requests}, out tokens {r['output_tokens']}",
                                flush=True,
                            )
                    finally:
                        stop(proc)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write(args, rates, arms, runs, failures)
    return 0


def _flags() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "?"
    return ",".join(sorted({f for f in ("avx512_bf16", "avx2") if f in out.split()}))


def write(args, rates, arms, runs, failures) -> None:
    date = datetime.date.today().isoformat()
    tag = f"serve_http_cpu_{os.cpu_count()}cpu-x86_{date}"
    summary = []
    for rate in rates:
        for arm in arms:
            rs = [x["report"] for x in runs if x["arm"] == arm and x["rate"] == rate]
            # a run counts only with every request done and exactly the tokens asked for
            want = args.requests * args.output_len
            rs = [r for r in rs if r["failed"] == 0 and r["output_tokens"] == want]
            if not rs:
                continue
            tput = [r["output_throughput"] for r in rs]
            tpot = [r["tpot_ms"]["p99"] for r in rs]
            summary.append(
                {
                    "rate": "inf" if rate == float("inf") else rate,
                    "arm": arm,
                    "n": len(rs),
                    "tok_s_median": statistics.median(tput),
                    "tok_s_min": min(tput),
                    "tok_s_max": max(tput),
                    "p99_tpot_ms_median": statistics.median(tpot),
                    "p99_tpot_ms_min": min(tpot),
                    "p99_tpot_ms_max": max(tpot),
                }
            )
    argv = [("DIR" if args.tf_pythonpath and a == args.tf_pythonpath else a) for a in sys.argv]
    cmd = "PYTHONPATH=src python " + " ".join(argv)
    import importlib.metadata as md

    def ver(pkg: str, path: str = "") -> str:
        try:
            if path:
                return next(md.distributions(name=pkg, path=[path])).version
            return md.version(pkg)
        except (md.PackageNotFoundError, StopIteration):
            return "not installed"

    versions = {
        "python": sys.version.split()[0],
        "torch": ver("torch"),
        "transformers": ver("transformers"),
        "httpx": ver("httpx"),
        "openai (transformers arm)": ver("openai", args.tf_pythonpath)
        if args.tf_pythonpath
        else ver("openai"),
        "accelerate (transformers arm)": ver("accelerate", args.tf_pythonpath)
        if args.tf_pythonpath
        else ver("accelerate"),
    }
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_name(),
        "cpu_flags": _flags(),
        "command": cmd,
        "versions": versions,
        # paths name this run's machine, not the product: the record keeps what was set
        "args": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "tf_pythonpath": "DIR" if args.tf_pythonpath else None,
        },
        "summary": summary,
        "failures": failures,
        "runs": runs,
    }
    lines = [
        f"# moeflow serve vs transformers serve over HTTP (CPU), {date}",
        "",
        f"- machine: {cpu_name()}, {os.cpu_count()} CPUs, flags: {info['cpu_flags']}",
        f"- command: `{cmd}`",
        "- software: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        f"- workload: {args.requests} requests/run, {args.input_len} prompt tokens, "
        f"{args.output_len} output tokens, Poisson arrivals; {args.threads} torch thread(s) "
        f"per server process; {args.repeat} repeats, arms and rates in shuffled order",
        "- model: random-weight Qwen3-MoE, hidden 256, 4 layers, 8 experts top-2, float32",
        "",
        "| rate (req/s) | server | n | output tok/s median (min-max) "
        "| p99 TPOT ms median (min-max) |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['rate']} | {s['arm']} | {s['n']} | {s['tok_s_median']:.1f} "
            f"({s['tok_s_min']:.1f}-{s['tok_s_max']:.1f}) | {s['p99_tpot_ms_median']:.1f} "
            f"({s['p99_tpot_ms_min']:.1f}-{s['p99_tpot_ms_max']:.1f}) |"
        )
    for arm, why in failures.items():
        lines += ["", f"**{arm} did not run**:", "", "```", why.strip(), "```"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, tag + ".json"), "w") as f:
        json.dump(info, f, indent=1)
    with open(os.path.join(args.out, tag + ".md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
