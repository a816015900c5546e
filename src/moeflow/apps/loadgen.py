"""``moeflow load``: an open-loop load generator for any OpenAI-compatible server.

Modelled on vLLM's ``benchmarks/benchmark_serving.py``: ``requests`` streaming
``/v1/completions`` requests, each with a prompt of ``input_len`` token ids (drawn uniformly
from ``[0, vocab_size)`` with ``seed``, vLLM's "random" dataset) and ``max_tokens =
output_len`` with ``ignore_eos`` (vLLM's extension), so every request generates exactly
``output_len`` tokens. Arrival times follow a Poisson process of ``rate`` requests/s
(exponential inter-arrival gaps, as vLLM's ``get_request``), or all requests start at once
for ``rate = inf``.

Metrics, as vLLM defines them (``calculate_metrics``):

* TTFT and ITL count the chunks that carry text: TTFT is the wait for the first, ITL the gaps
  between consecutive ones (vLLM counts every chunk with ``choices``; a server that ends with
  an empty ``finish_reason`` chunk would add a near-zero gap per request to that count);
* TPOT: ``(latency - TTFT) / (output tokens - 1)`` per request with more than one token;
* E2E latency: time from sending to the last event before ``[DONE]``;
* throughput: output tokens and completed requests per second of the benchmark duration
  (first send to last completion);
* goodput: completed requests per second that meet both ``slo_ttft_ms`` and ``slo_tpot_ms``
  (vLLM's ``--goodput ttft:X tpot:Y``).

Output token counts come from the server's ``usage`` (``stream_options.include_usage``) when
it sends one, else from the number of chunks. Percentiles are ``numpy.percentile`` (linear).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field

from moeflow.errors import ConfigError, MoeflowError

PERCENTILES = (50, 90, 99)


class ServerUnreachableError(MoeflowError, RuntimeError):
    """The server could not be reached (connection refused, DNS failure, timeout)."""


class LoadFailedError(MoeflowError, RuntimeError):
    """The server answered, but no request of the load completed."""


@dataclass
class LoadConfig:
    url: str
    model: str
    rate: float = math.inf
    requests: int = 100
    input_len: int = 128
    output_len: int = 128
    seed: int = 0
    vocab_size: int = 256
    prompt_text: bool = False
    ignore_eos: bool = True
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    timeout_s: float = 600.0

    def check(self) -> None:
        if not isinstance(self.url, str) or not self.url.startswith(("http://", "https://")):
            raise ConfigError("--url", self.url, "an http:// or https:// URL")
        if not self.model:
            raise ConfigError("--model", self.model, "a non-empty model name")
        if not (self.rate > 0):  # also rejects NaN
            raise ConfigError("--rate", self.rate, "requests/s > 0, or inf")
        for name, v in (
            ("--requests", self.requests),
            ("--input-len", self.input_len),
            ("--output-len", self.output_len),
            ("--vocab-size", self.vocab_size),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(name, v, "an int >= 1")
        for name, v in (("--slo-ttft-ms", self.slo_ttft_ms), ("--slo-tpot-ms", self.slo_tpot_ms)):
            if v is not None and not (v > 0 and math.isfinite(v)):
                raise ConfigError(name, v, "a finite number of milliseconds > 0")
        if (self.slo_ttft_ms is None) != (self.slo_tpot_ms is None):
            raise ConfigError(
                "--slo-ttft-ms/--slo-tpot-ms",
                (self.slo_ttft_ms, self.slo_tpot_ms),
                "both or neither (goodput counts requests meeting both)",
            )
        if not (self.timeout_s > 0):
            raise ConfigError("--timeout", self.timeout_s, "seconds > 0")


def poisson_schedule(n: int, rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of ``n`` requests: a Poisson process of ``rate``
    requests/s (i.i.d. exponential gaps of mean ``1/rate``, vLLM's ``get_request``), the first
    request at 0; all zeros for ``rate = inf``."""
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for i in range(n):
        if i:
            t += rng.expovariate(rate)
        out.append(t)
    return out


_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def make_prompts(cfg: LoadConfig) -> list[list[int]] | list[str]:
    """``requests`` prompts of ``input_len`` token ids, uniform over ``[0, vocab_size)``; with
    ``prompt_text``, strings of ``input_len`` letters a-z instead (for servers that take text
    only: ``input_len`` tokens under a character-level tokenizer, fewer under BPE; the report's
    ``input_tokens`` is the server's count)."""
    rng = random.Random(cfg.seed + 1)
    if cfg.prompt_text:
        return ["".join(rng.choices(_LETTERS, k=cfg.input_len)) for _ in range(cfg.requests)]
    return [
        [rng.randrange(cfg.vocab_size) for _ in range(cfg.input_len)] for _ in range(cfg.requests)
    ]


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


async def _one(client, cfg: LoadConfig, prompt: list[int] | str) -> RequestResult:
    body = {
        "model": cfg.model,
        "prompt": prompt,
        "max_tokens": cfg.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.ignore_eos:  # vLLM's extension; servers without it may reject unknown fields
        body["ignore_eos"] = True
    res = RequestResult(ok=False)
    start = time.perf_counter()
    last = end = start
    chunks = 0
    usage = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                res.error = f"HTTP {r.status_code}: {' '.join(text.split())[:200]}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    break
                ev = json.loads(data)
                if "error" in ev:  # OpenAI's {"error": {"message": ...}} or a bare string
                    err = ev["error"]
                    res.error = str(err.get("message", err) if isinstance(err, dict) else err)
                    return res
                if ev.get("usage"):
                    usage = ev["usage"]
                now = time.perf_counter()
                end = now
                choices = ev.get("choices") or []
                if not (choices and (choices[0].get("text") or "")):
                    continue  # usage-only, or an empty final chunk: no token arrived
                if chunks == 0:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
                chunks += 1
    except Exception as e:  # one failed request is counted, not fatal (as vLLM)
        res.error = f"{type(e).__name__}: {e}"
        return res
    res.latency = max(end, last) - start
    if usage:
        res.output_tokens = int(usage.get("completion_tokens", chunks))
        res.prompt_tokens = int(usage.get("prompt_tokens", 0))
    else:
        res.output_tokens = chunks
    if chunks == 0:  # every token decoded to no text: the first "token" is the end
        res.ttft = res.latency
    res.ok = res.output_tokens > 0
    if not res.ok:
        res.error = "the stream held no tokens"
    return res


def _stats(xs: list[float]) -> dict:
    import numpy as np

    if not xs:
        return {"mean": None, **{f"p{p}": None for p in PERCENTILES}}
    a = np.asarray(xs, dtype=float) * 1000.0
    out = {"mean": float(a.mean())}
    for p in PERCENTILES:
        out[f"p{p}"] = float(np.percentile(a, p))
    return out


def summarize(cfg: LoadConfig, results: list[RequestResult], duration: float) -> dict:
    """The report (times in ms, rates per second) of one run, as vLLM's ``calculate_metrics``."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    tpots = [t for t in (r.tpot for r in ok) if t is not None]
    report = {
        "config": asdict(cfg) | {"rate": "inf" if math.isinf(cfg.rate) else cfg.rate},
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "input_tokens": sum(r.prompt_tokens for r in ok),
        "output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "output_throughput": out_tokens / duration if duration > 0 else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpots),
        "itl_ms": _stats([x for r in ok for x in r.itl]),
        "e2el_ms": _stats([r.latency for r in ok]),
        "goodput": None,
        # per request, in send order (vLLM's --save-result keeps the same lists)
        "requests": [
            {
                "ok": r.ok,
                "ttft_ms": r.ttft * 1000.0,
                "tpot_ms": None if r.tpot is None else r.tpot * 1000.0,
                "e2el_ms": r.latency * 1000.0,
                "output_tokens": r.output_tokens,
                "chunks": len(r.itl) + (1 if r.ok else 0),
            }
            for r in results
        ],
    }
    if cfg.slo_ttft_ms is not None:
        good = sum(
            1
            for r in ok
            if r.ttft * 1000.0 <= cfg.slo_ttft_ms
            and (r.tpot is None or r.tpot * 1000.0 <= cfg.slo_tpot_ms)
        )
        report["good_requests"] = good
        report["goodput"] = good / duration if duration > 0 else 0.0
    return report


async def _probe(client, cfg: LoadConfig) -> None:
    """Fail fast, with one line, when nothing answers at ``cfg.url``."""
    import httpx

    try:
        await client.get("/v1/models", timeout=min(cfg.timeout_s, 10.0))
    except httpx.HTTPError as e:
        raise ServerUnreachableError(
            f"cannot reach {cfg.url}: {type(e).__name__}: {e or 'no answer'}"
        ) from None


async def run_load_async(cfg: LoadConfig) -> dict:
    import httpx

    cfg.check()
    prompts = make_prompts(cfg)
    schedule = poisson_schedule(cfg.requests, cfg.rate, cfg.seed)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(
        base_url=cfg.url.rstrip("/"), timeout=cfg.timeout_s, limits=limits
    ) as client:
        await _probe(client, cfg)
        t0 = time.perf_counter()

        async def at(delay: float, prompt) -> tuple[RequestResult, float]:
            wait = t0 + delay - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            r = await _one(client, cfg, prompt)
            return r, time.perf_counter()

        done = await asyncio.gather(*(at(d, p) for d, p in zip(schedule, prompts)))
    results = [r for r, _ in done]
    duration = max(end for _, end in done) - t0
    return summarize(cfg, results, duration)


def run_load(cfg: LoadConfig) -> dict:
    """Run the load of ``cfg`` against its server and return the report (:func:`summarize`)."""
    return asyncio.run(run_load_async(cfg))


def format_report(rep: dict) -> str:
    c = rep["config"]
    lines = [
        f"{'requests completed / failed':<34}{rep['completed']} / {rep['failed']}",
        f"{'rate (req/s)':<34}{c['rate']}",
        f"{'duration (s)':<34}{rep['duration_s']:.3f}",
        f"{'input / output tokens':<34}{rep['input_tokens']} / {rep['output_tokens']}",
        f"{'request throughput (req/s)':<34}{rep['request_throughput']:.3f}",
        f"{'output throughput (tok/s)':<34}{rep['output_throughput']:.2f}",
    ]
    if rep["goodput"] is not None:
        lines.append(
            f"{'goodput (req/s)':<34}{rep['goodput']:.3f}  "
            f"(TTFT <= {c['slo_ttft_ms']} ms and TPOT <= {c['slo_tpot_ms']} ms: "
            f"{rep['good_requests']} requests)"
        )
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL")):
        s = rep[key]
        if s["mean"] is None:
            lines.append(f"{name + ' (ms)':<34}n/a")
            continue
        lines.append(
            f"{name + ' (ms) mean/p50/p90/p99':<34}"
            + " / ".join(f"{s[k]:.2f}" for k in ("mean", "p50", "p90", "p99"))
        )
    for e in rep["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)
