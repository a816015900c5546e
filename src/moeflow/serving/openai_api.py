"""An OpenAI-compatible HTTP API over a continuous-batching :class:`~moeflow.serving.engine.Engine`
(FastAPI; the ``[serve]`` extra).

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true``
for server-sent events ending in ``data: [DONE]``, as OpenAI's API), ``GET /v1/models``,
``GET /health``.

Request fields honoured: ``prompt`` (a string or a list of token ids) or ``messages``
(rendered with the checkpoint's own chat template), ``max_tokens`` (chat also
``max_completion_tokens``; default: the rest of the context, as vLLM), ``temperature``
(default 1), ``top_p``, ``seed``, ``stop`` (strings; the text ends before the first one),
``n`` (1 only), ``stream``, ``stream_options.include_usage``, and vLLM's extensions
``ignore_eos``, ``stop_token_ids`` and ``return_token_ids`` (adds ``token_ids`` and
``prompt_token_ids`` to each choice). Fields the server cannot honour (``logprobs``,
``echo``, ``suffix``, ``tools``, ``logit_bias``, penalties other than 0, ``n > 1``) are
rejected rather than silently ignored; unknown fields are ignored, as OpenAI's API does.

Errors are OpenAI's JSON shape ``{"error": {"message", "type", "param", "code"}}``: a bad
request (a moeflow ``ValueError``: ConfigError, InputError) is HTTP 400 naming the field, an
unknown model 404, a server that is shutting down or lost a rank (a disaggregated server's
:class:`~moeflow.serving.engine.RankDiedError`, or a transfer that failed) 503 with a message
naming it; nothing returns a traceback. ``GET /health`` is the engine's
:meth:`~moeflow.serving.engine.Engine.health`: HTTP 200 while its ``status`` is ``"ok"``,
else 503 with the same body.

Text: tokens are decoded with ``skip_special_tokens``; the stop token that ends a request
(EOS or a ``stop_token_ids`` entry) is not part of the text. A streamed response sends the
text as it becomes final, holding back a tail that could still grow into a ``stop`` string
or is an incomplete UTF-8 sequence, so the streamed deltas concatenate to exactly the
non-streamed text.
"""

# No ``from __future__ import annotations``: FastAPI reads the route signatures' annotations
# (``fastapi.Request``, imported only when the app is built) at definition time.

import asyncio
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from moeflow._deps import require
from moeflow.errors import CommTimeoutError, ConfigError, InputError, MoeflowError
from moeflow.models import SamplingParams
from moeflow.serving.engine import Engine, EngineClosedError, RankDiedError, RequestHandle
from moeflow.validate import is_int

# Fields that change what OpenAI's API returns and that this server does not implement:
# name -> the values that mean "not used".
_UNSUPPORTED = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "tools": (None, []),
    "functions": (None, []),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
}
_FINISH = {"stop": "stop", "length": "length", "context": "length", "abort": "abort"}


log = logging.getLogger(__name__)


def _show(v, limit: int = 80):
    """``v`` for an error message: itself if its repr is short, else a truncated repr."""
    r = repr(v)
    return v if len(r) <= limit else _Shown(r[: limit - 3] + "...")


class _Shown(str):
    def __repr__(self) -> str:
        return str(self)


class ModelNotFoundError(MoeflowError, LookupError):
    """The request names a model this server does not serve."""


# ---- request parsing (pure; raises typed errors) --------------------------------------


def _number(body: dict, name: str, default: float, lo: float, hi: float, lo_open=False) -> float:
    v = body.get(name)
    if v is None:
        return default
    bad = isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
    if bad or v > hi or v < lo or (lo_open and v == lo):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise ConfigError(name, _show(v), f"a number in {rng}")
    return float(v)


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ConfigError(name, _show(v), "true or false")
    return v


def _stops(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    v = [v] if isinstance(v, str) else v
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise ConfigError("stop", _show(body.get("stop")), "a non-empty string or a list of them")
    return v


def _token_ids(body: dict, name: str) -> list[int]:
    v = body.get(name)
    if v is None:
        return []
    if not isinstance(v, list) or not all(is_int(t) and t >= 0 for t in v):
        raise ConfigError(name, _show(v), "a list of token ids (ints >= 0)")
    return v


def check_unsupported(body: dict) -> None:
    for name, unused in _UNSUPPORTED.items():
        if name in body and not any(
            body[name] == u and type(body[name]) is type(u) for u in unused
        ):
            raise ConfigError(
                name, _show(body[name]), "not supported by this server (leave it out)"
            )
    n = body.get("n")
    if n is not None and (not is_int(n) or n != 1):
        raise ConfigError("n", _show(n), "1 (one choice per request)")


def sampling_params(
    body: dict, prompt_len: int, context: int, eos_token_ids: Sequence[int]
) -> SamplingParams:
    """The :class:`SamplingParams` of an OpenAI request body (see the module doc)."""
    if prompt_len >= context:
        raise InputError(
            f"the prompt has {prompt_len} tokens; the model's context is {context}, "
            "which leaves no room for a completion"
        )
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else None
    name = name or "max_tokens"
    max_tokens = body.get(name)
    if max_tokens is None:
        max_tokens = context - prompt_len
    elif not is_int(max_tokens) or max_tokens < 1:
        raise ConfigError(name, _show(max_tokens), "an int >= 1")
    elif prompt_len + max_tokens > context:
        raise ConfigError(
            name,
            max_tokens,
            f"at most {context - prompt_len}: the context is {context} tokens and the prompt "
            f"has {prompt_len}",
        )
    seed = body.get("seed")
    if seed is not None and not is_int(seed):
        raise ConfigError("seed", _show(seed), "an int or null")
    stop_ids = _token_ids(body, "stop_token_ids")
    if not _bool(body, "ignore_eos"):
        stop_ids = stop_ids + [t for t in eos_token_ids if t not in stop_ids]
    return SamplingParams(
        max_new_tokens=int(max_tokens),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=seed,
        stop_token_ids=tuple(stop_ids),
    )


def _chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ConfigError("messages", _show(msgs), "a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ConfigError(f"messages[{i}]", _show(m), "an object with a string role")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI's content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise ConfigError(f"messages[{i}].content", _show(content), "text parts only")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise ConfigError(f"messages[{i}].content", _show(m.get("content")), "a string")
        out.append({"role": m["role"], "content": content})
    return out


# ---- text: incremental detokenisation with stop strings --------------------------------


class TextAssembler:
    """Turns a growing token list into text deltas that are final: the tail that could
    still become a ``stop`` string (``max(len(stop)) - 1`` characters) or that ends in an
    incomplete UTF-8 sequence (U+FFFD) is held until more tokens or the end come."""

    def __init__(self, tokenizer, stops: list[str], stop_token_ids: Sequence[int]):
        self.tokenizer, self.stops, self.stop_ids = tokenizer, stops, set(stop_token_ids)
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.sent = 0
        self.stopped = False  # a stop string was found

    def update(self, tokens: list[int], final: bool) -> str:
        visible = tokens[:-1] if tokens and tokens[-1] in self.stop_ids else tokens
        text = self.tokenizer.decode(visible, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            text, final, self.stopped = text[: min(hits)], True, True
        end = len(text)
        if not final:
            end = max(self.sent, end - self.hold)
            while end > self.sent and text[end - 1] == "\ufffd":
                end -= 1
        delta, self.sent = text[self.sent : end], max(self.sent, end)
        return delta


# ---- engine thread -> event loop ---------------------------------------------------------


class _Mailbox:
    """Hands the engine thread's token events to one event loop's request queues.

    Each wake-up of the loop (``call_soon_threadsafe``: a write to its self-pipe) hands the
    GIL to the loop thread while the engine thread is mid-step, so the engine wakes the loop
    once per step, not once per token: events collect here and :meth:`flush`, which the
    engine calls at the end of each step (:meth:`Engine.add_step_listener`), schedules one
    drain. Without ``batched`` (an engine with no step listeners) the first event into an
    empty mailbox schedules the drain. Each queue receives its events in order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, batched: bool):
        self.loop, self.batched = loop, batched
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []
        self._scheduled = False  # a drain is queued on the loop and has not run yet

    def put(self, queue: asyncio.Queue, item) -> None:
        """Queue ``item`` for ``queue`` (engine thread)."""
        with self._lock:
            self._items.append((queue, item))
            wake = not self.batched and not self._scheduled
            self._scheduled |= wake
        if wake:
            self._wake()

    def flush(self) -> None:
        """Schedule a drain of the events put so far (engine thread, end of a step)."""
        with self._lock:
            wake = bool(self._items) and not self._scheduled
            self._scheduled |= wake
        if wake:
            self._wake()

    def _wake(self) -> None:
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: its requests are gone with it
            pass

    def _drain(self) -> None:
        with self._lock:
            items, self._items, self._scheduled = self._items, [], False
        for queue, item in items:
            queue.put_nowait(item)


# ---- the app ----------------------------------------------------------------------------


def _error(status: int, message: str, type_: str, param: str | None = None, code=None):
    fastapi_responses = require("fastapi.responses", "moeflow serve")
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return fastapi_responses.JSONResponse(body, status_code=status)


def error_response(exc: BaseException):
    """The OpenAI-style JSON error response for ``exc``."""
    if isinstance(exc, ModelNotFoundError):
        return _error(404, str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, (EngineClosedError, CommTimeoutError, RankDiedError)):
        # the server cannot serve (closing, or a rank of a disaggregated server is gone):
        # the message names what failed, and no traceback
        return _error(503, str(exc), "service_unavailable")
    if isinstance(exc, MoeflowError) and isinstance(exc, ValueError):
        param = getattr(exc, "field", None)
        return _error(400, str(exc), "invalid_request_error", param)
    log.error("request failed", exc_info=exc)  # the traceback stays in the server's log
    return _error(500, f"internal error: {type(exc).__name__}", "internal_error")


class OpenAIServer:
    """The engine, the tokenizer and the served model name behind the routes."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        model_name: str,
        eos_token_ids: Sequence[int] | None = None,
    ):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        if eos_token_ids is None:
            eos = getattr(tokenizer, "eos_token_id", None)
            eos_token_ids = [eos] if is_int(eos) else []
        self.eos_token_ids = [int(t) for t in eos_token_ids]
        self.created = int(time.time())
        self._mailboxes: dict[asyncio.AbstractEventLoop, _Mailbox] = {}  # one per event loop

    def _mailbox(self, loop: asyncio.AbstractEventLoop) -> _Mailbox:
        box = self._mailboxes.get(loop)
        if box is None:
            for old in [b for lp, b in self._mailboxes.items() if lp.is_closed()]:
                del self._mailboxes[old.loop]
                if old.batched:
                    self.engine.remove_step_listener(old.flush)
            batched = hasattr(self.engine, "add_step_listener")
            box = self._mailboxes[loop] = _Mailbox(loop, batched)
            if batched:
                self.engine.add_step_listener(box.flush)
        return box

    # -- parsing
    def _check_model(self, body: dict) -> None:
        m = body.get("model")
        if m is not None and m != self.model_name:
            raise ModelNotFoundError(
                f"the model {m!r} does not exist; this server serves {self.model_name!r}"
            )

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        if chat:
            msgs = _chat_messages(body)
            if not getattr(self.tokenizer, "chat_template", None):
                raise InputError("the model's tokenizer has no chat template; use /v1/completions")
            try:
                text = self.tokenizer.apply_chat_template(
                    msgs, add_generation_prompt=True, tokenize=False
                )
            except Exception as e:  # the template rejected the conversation (roles, order)
                raise InputError(f"the chat template rejected the messages: {e}") from e
            return list(self.tokenizer.encode(text, add_special_tokens=False))
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            ids = list(self.tokenizer.encode(p, add_special_tokens=True))
        elif isinstance(p, list) and p and all(is_int(t) for t in p):
            ids = list(p)
        else:
            raise ConfigError(
                "prompt",
                _show(p),
                "a non-empty string or list of token ids (one prompt per request)",
            )
        if not ids:
            raise InputError("the prompt encodes to no tokens")
        return ids

    def parse(self, body: Any, chat: bool):
        """(prompt ids, SamplingParams, stop strings) of a request body, or a typed error."""
        if not isinstance(body, dict):
            raise InputError("the request body must be a JSON object")
        self._check_model(body)
        check_unsupported(body)
        ids = self._prompt_ids(body, chat)
        params = sampling_params(body, len(ids), self.engine.context, self.eos_token_ids)
        return ids, params, _stops(body)

    # -- running
    async def run(self, ids, params, stops) -> AsyncIterator[tuple[str, list[int], str | None]]:
        """Yield (text delta, tokens so far, finish_reason or None) until the request ends."""
        box = self._mailbox(asyncio.get_running_loop())
        queue: asyncio.Queue = asyncio.Queue()

        def on_token(h: RequestHandle, tok: int) -> None:
            box.put(queue, tok)

        def on_finish(h: RequestHandle) -> None:
            box.put(queue, None)

        handle = self.engine.submit(
            ids, params, uuid.uuid4().hex, on_token=on_token, on_finish=on_finish
        )
        text = TextAssembler(self.tokenizer, stops, params.stop_token_ids)
        tokens: list[int] = []
        try:
            while True:
                tok = await queue.get()
                final = tok is None
                if not final:
                    tokens.append(tok)
                delta = text.update(tokens, final)
                if text.stopped:
                    handle.abort()
                    yield delta, tokens, "stop"
                    return
                if final:
                    res = handle.result
                    if res.error is not None:
                        raise res.error
                    yield delta, tokens, _FINISH.get(res.finish_reason, res.finish_reason)
                    return
                if delta:
                    yield delta, tokens, None
        finally:
            handle.abort()  # a client that went away frees its blocks (no-op when done)


def build_app(server: OpenAIServer, *, manage_engine: bool = True):
    """The FastAPI app of ``server``. With ``manage_engine`` the app's lifespan starts the
    engine thread and, at shutdown, drains the requests in flight before stopping it."""
    fastapi = require("fastapi", "moeflow serve")
    responses = require("fastapi.responses", "moeflow serve")
    import contextlib

    @contextlib.asynccontextmanager
    async def lifespan(app):
        if manage_engine:
            server.engine.start()
        yield
        if manage_engine:
            await asyncio.to_thread(server.engine.shutdown, True)

    app = fastapi.FastAPI(title="moeflow", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(Exception)
    async def _any_error(request, exc):  # no traceback ever reaches the client
        return error_response(exc)

    @app.exception_handler(fastapi.exceptions.RequestValidationError)
    async def _invalid(request, exc):  # FastAPI's own 422 becomes OpenAI's 400
        return _error(400, str(exc.errors()[:3]), "invalid_request_error")

    async def _body(request) -> Any:
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError) as e:
            raise InputError(f"the request body is not valid JSON: {e}") from e

    @app.get("/health")
    async def health():
        state = server.engine.health()
        if state.get("status") == "ok":
            return state
        return responses.JSONResponse(state, status_code=503)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": server.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "moeflow",
            "max_model_len": server.engine.context,
        }
        return {"object": "list", "data": [card]}

    async def _complete(request, chat: bool):
        try:
            body = await _body(request)
            ids, params, stops = server.parse(body, chat)
            stream = _bool(body, "stream")
            opts = body.get("stream_options") or {}
            include_usage = isinstance(opts, dict) and opts.get("include_usage") is True
            return_ids = _bool(body, "return_token_ids")
        except Exception as e:
            return error_response(e)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"

        def usage(n_out: int) -> dict:
            return {
                "prompt_tokens": len(ids),
                "completion_tokens": n_out,
                "total_tokens": len(ids) + n_out,
            }

        def choice(text: str, finish, tokens, delta: bool) -> dict:
            if chat:
                c = {"index": 0, ("delta" if delta else "message"): {"content": text}}
                if not delta:
                    c["message"]["role"] = "assistant"
            else:
                c = {"index": 0, "text": text, "logprobs": None}
            c["finish_reason"] = finish
            if return_ids and (finish is not None or not delta):
                c["token_ids"] = list(tokens)
                c["prompt_token_ids"] = list(ids)
            return c

        if not stream:
            parts, tokens, finish = [], [], None
            try:
                async for delta, toks, fin in server.run(ids, params, stops):
                    parts.append(delta)
                    tokens, finish = toks, fin
            except Exception as e:
                return error_response(e)
            return {
                "id": rid,
                "object": obj,
                "created": created,
                "model": server.model_name,
                "choices": [choice("".join(parts), finish, tokens, False)],
                "usage": usage(len(tokens)),
            }

        # submit before the response starts, so a bad request or a closing engine is an
        # HTTP error rather than an error event
        events = server.run(ids, params, stops)
        try:
            first = await anext(events)
        except Exception as e:
            return error_response(e)

        def chunk(choices: list, usage_: dict | None = None) -> str:
            d = {
                "id": rid,
                "object": obj + ".chunk" if chat else obj,
                "created": created,
                "model": server.model_name,
                "choices": choices,
            }
            if usage_ is not None:
                d["usage"] = usage_
            return f"data: {json.dumps(d)}\n\n"

        async def sse():
            n_out = 0
            try:
                if chat:
                    role = {"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}
                    yield chunk([role])
                ev = first
                while True:
                    delta, tokens, finish = ev
                    n_out = len(tokens)
                    yield chunk([choice(delta, finish, tokens, True)])
                    if finish is not None:
                        break
                    ev = await anext(events)
                if include_usage:
                    yield chunk([], usage(n_out))
                yield "data: [DONE]\n\n"
            except Exception as e:  # after the headers: the error goes in the stream
                err = json.loads(error_response(e).body)
                yield f"data: {json.dumps(err)}\n\ndata: [DONE]\n\n"
            finally:  # also when the client goes away: the request leaves the engine
                await events.aclose()

        return responses.StreamingResponse(sse(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: fastapi.Request):
        return await _complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: fastapi.Request):
        return await _complete(request, chat=True)

    return app


def eos_token_ids(model_dir, tokenizer) -> list[int]:
    """The ids that end generation: ``generation_config.json``'s ``eos_token_id`` (an int
    or a list, as transformers writes it) and the tokenizer's EOS."""
    from pathlib import Path

    ids: list[int] = []
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        try:
            v = json.loads(gen.read_text()).get("eos_token_id")
        except (ValueError, AttributeError):
            v = None
        ids += [v] if is_int(v) else [t for t in (v or []) if is_int(t)]
    tok = getattr(tokenizer, "eos_token_id", None)
    if is_int(tok) and tok not in ids:
        ids.append(tok)
    return ids


def from_pretrained(
    model_dir, engine_config=None, model_name: str | None = None, dtype=None, device="cpu"
) -> OpenAIServer:
    """An :class:`OpenAIServer` for a transformers checkpoint directory: the model
    (:func:`moeflow.checkpoint.load_pretrained`), its own tokenizer and chat template
    (``AutoTokenizer``), and an engine (not started) on ``device``."""
    from pathlib import Path

    import torch

    from moeflow.checkpoint import load_pretrained

    require("transformers", "moeflow serve (the checkpoint's tokenizer)")
    model = load_pretrained(model_dir, dtype=dtype or torch.float32).to(device)
    tokenizer = load_tokenizer(model_dir)
    name = model_name or Path(model_dir).resolve().name
    engine = Engine(model, engine_config)
    return OpenAIServer(engine, tokenizer, name, eos_token_ids(model_dir, tokenizer))


def load_tokenizer(model_dir):
    """The checkpoint's own tokenizer (``AutoTokenizer``); InputError when there is none."""
    transformers = require("transformers", "moeflow serve (the checkpoint's tokenizer)")
    try:
        return transformers.AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise InputError(f"{model_dir}: no usable tokenizer ({type(e).__name__}: {e})") from e
