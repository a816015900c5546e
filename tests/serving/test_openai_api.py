"""The OpenAI-compatible server (moeflow.serving.openai_api) on a live uvicorn: greedy tokens
equal moeflow's and transformers' generate for concurrent requests; streaming gives the
non-streamed text; stop / max_tokens / ignore_eos; OpenAI-style 400s; /health, /v1/models."""

import asyncio
import json
import threading
import time

import pytest
import torch

from moeflow.models import Request, SamplingParams, generate

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

PROMPTS = ["hi", "hello world, how are you", "the quick brown fox", "0123456789 abc de", "x"]


def _hf_greedy(hf_model, ids, n):
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


async def _post_all(url, path, bodies):
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        rs = await asyncio.gather(*(c.post(path, json=b) for b in bodies))
    return rs


def _sse(text: str) -> list:
    """The JSON events of a server-sent-event body (asserting it ends with [DONE])."""
    lines = [ln[len("data: ") :] for ln in text.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_concurrent_greedy_completions_match_generate_and_transformers(served, checkpoint):
    server, url = served
    hf_model, _ = checkpoint
    tok = server.tokenizer
    lens = [12, 5, 20, 9, 16]
    bodies = [
        {
            "model": "tiny",
            "prompt": p,
            "max_tokens": n,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        for p, n in zip(PROMPTS, lens)
    ]
    rs = asyncio.run(_post_all(url, "/v1/completions", bodies))
    ids = [tok.encode(p) for p in PROMPTS]
    ref = generate(server.engine.model, [Request(i, SamplingParams(n)) for i, n in zip(ids, lens)])
    for r, i, n, g in zip(rs, ids, lens, ref):
        assert r.status_code == 200, r.text
        body = r.json()
        ch = body["choices"][0]
        assert ch["prompt_token_ids"] == i
        assert ch["token_ids"] == g.tokens == _hf_greedy(hf_model, i, n)
        assert ch["text"] == tok.decode(g.tokens, skip_special_tokens=True)
        assert ch["finish_reason"] == "length"
        assert body["usage"] == {
            "prompt_tokens": len(i),
            "completion_tokens": n,
            "total_tokens": len(i) + n,
        }
        assert body["object"] == "text_completion" and body["model"] == "tiny"


def test_chat_uses_the_checkpoint_template(served, checkpoint):
    server, url = served
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    r = httpx.post(
        f"{url}/v1/chat/completions",
        json={
            "messages": msgs,
            "max_tokens": 10,
            "temperature": 0,
            "ignore_eos": True,
            "return_token_ids": True,
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    ch = r.json()["choices"][0]
    want = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi there<|im_end|>\n"
    ids = server.tokenizer.encode(want + "<|im_start|>assistant\n", add_special_tokens=False)
    assert ch["prompt_token_ids"] == ids
    assert ch["token_ids"] == _hf_greedy(checkpoint[0], ids, 10)
    assert ch["message"]["role"] == "assistant"
    assert ch["message"]["content"] == server.tokenizer.decode(
        ch["token_ids"], skip_special_tokens=True
    )
    assert r.json()["object"] == "chat.completion"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("stop", [False, True], ids=["nostop", "stop"])
def test_streaming_returns_the_non_streamed_text(served, chat, stop):
    _, url = served
    path = "/v1/chat/completions" if chat else "/v1/completions"
    base = {"max_tokens": 25, "temperature": 0.7, "seed": 3, "ignore_eos": True}
    base |= (
        {"messages": [{"role": "user", "content": "tell me"}]}
        if chat
        else {"prompt": "once upon a time"}
    )
    if stop:  # two stop strings: one the seeded text holds from its 7th character, one not
        full = httpx.post(url + path, json=base, timeout=60).json()["choices"][0]
        full = full["message"]["content"] if chat else full["text"]
        assert len(full) > 8
        stop_at = full.find(full[6:8])
        base["stop"] = ["}}}", full[6:8]]
    plain = httpx.post(url + path, json=base, timeout=60)
    streamed = httpx.post(
        url + path,
        json=base | {"stream": True, "stream_options": {"include_usage": True}},
        timeout=60,
    )
    assert plain.status_code == streamed.status_code == 200
    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = _sse(streamed.text)
    key = "delta" if chat else None
    pieces = [
        (e["choices"][0][key].get("content", "") if key else e["choices"][0]["text"])
        for e in events
        if e["choices"]
    ]
    ch = plain.json()["choices"][0]
    text = ch["message"]["content"] if chat else ch["text"]
    assert "".join(pieces) == text
    assert len([p for p in pieces if p]) > 1 or len(text) <= 1  # text came in pieces
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == ch["finish_reason"] and set(finishes[:-1]) == {None}
    assert events[-1]["usage"] == plain.json()["usage"]
    if stop:
        assert ch["finish_reason"] == "stop" and text == full[:stop_at]
    if chat:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant"}
        assert events[0]["object"] == "chat.completion.chunk"


def test_stop_strings_and_max_tokens(served):
    server, url = served
    body = {"prompt": "hello", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    full = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    text = full["text"]
    assert full["finish_reason"] == "length" and len(text) > 6
    cut = text[4:6]  # a stop string first found at position text.find(cut)
    r = httpx.post(f"{url}/v1/completions", json=body | {"stop": cut}, timeout=60).json()
    assert r["choices"][0]["text"] == text[: text.find(cut)]
    assert r["choices"][0]["finish_reason"] == "stop"
    r = httpx.post(f"{url}/v1/completions", json=body | {"max_tokens": 3}, timeout=60).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"
    assert r["choices"][0]["text"] == server.tokenizer.decode(
        server.tokenizer.encode(text)[:3], skip_special_tokens=True
    )


def test_ignore_eos(checkpoint, live_server):
    from moeflow.serving.engine import Engine, EngineConfig
    from moeflow.serving.openai_api import OpenAIServer, build_app, from_pretrained

    base = from_pretrained(checkpoint[1], EngineConfig(block_size=4))
    prompt = base.tokenizer.encode("hello")
    greedy = generate(base.engine.model, [Request(prompt, SamplingParams(12))])[0].tokens
    eos = greedy[4]
    first = greedy.index(eos)
    server = OpenAIServer(
        Engine(base.engine.model, EngineConfig(block_size=4)), base.tokenizer, "m", [eos]
    )
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True}
    with live_server(build_app(server)) as live:
        stopped = httpx.post(f"{live.url}/v1/completions", json=body, timeout=60).json()
        full = httpx.post(
            f"{live.url}/v1/completions", json=body | {"ignore_eos": True}, timeout=60
        ).json()
    ch = stopped["choices"][0]
    assert ch["finish_reason"] == "stop" and ch["token_ids"] == greedy[: first + 1]
    # the EOS token ends the request and is not part of the text
    assert ch["text"] == base.tokenizer.decode(greedy[:first], skip_special_tokens=True)
    assert full["choices"][0]["token_ids"] == greedy
    assert full["choices"][0]["finish_reason"] == "length"


BAD = [
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature"),
    ({"prompt": "hi", "top_p": 0}, "top_p"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 1000}, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 2.5}, "max_tokens"),
    ({"prompt": "hi", "n": 2}, "n"),
    ({"prompt": "hi", "logprobs": 3}, "logprobs"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop": 7}, "stop"),
    ({"prompt": "hi", "seed": "x"}, "seed"),
    ({"prompt": "hi", "ignore_eos": "yes"}, "ignore_eos"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": 5}, "prompt"),
    ({}, "prompt"),
    ({"prompt": [1, 2, 999]}, None),  # ids outside the vocabulary
    ({"prompt": "a" * 200}, None),  # longer than the context
]


@pytest.mark.parametrize("body,param", BAD, ids=[f"{p}-{i}" for i, (_, p) in enumerate(BAD)])
def test_bad_requests_are_400_json(served, body, param):
    _, url = served
    for stream in (False, True):
        r = httpx.post(
            f"{url}/v1/completions",
            json=body | {"stream": stream} if "stream" not in body else body,
            timeout=30,
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error" and err["message"]
        assert "Traceback" not in r.text
        if param is not None:
            assert err["param"] == param


@pytest.mark.parametrize(
    "body",
    [
        {"messages": []},
        {"messages": [{"role": "user"}]},
        {"messages": [{"content": "hi"}]},
        {"messages": "hi"},
    ],
)
def test_bad_chat_requests_are_400(served, body):
    r = httpx.post(f"{served[1]}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("messages")


def test_malformed_json_unknown_model_and_server_state(served):
    _, url = served
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/completions", json=[1, 2], timeout=30)
    assert r.status_code == 400
    r = httpx.post(f"{url}/v1/completions", json={"model": "gpt-9", "prompt": "a"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    h = httpx.get(f"{url}/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    assert h.json()["free_kv_blocks"] == served[0].engine.cache.pool.num_blocks  # all idle
    m = httpx.get(f"{url}/v1/models", timeout=30).json()
    assert m["object"] == "list" and [c["id"] for c in m["data"]] == ["tiny"]
    assert m["data"][0]["max_model_len"] == 96


def _stream_events(url, body, on_first=None):
    events = []
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body | {"stream": True}, timeout=60
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append((json.loads(line[len("data: ") :]), time.monotonic()))
                if len(events) == 1 and on_first is not None:
                    on_first()
    return events


def test_late_request_finishes_while_long_streams_decode(served):
    # continuous batching seen from HTTP: a short request sent after two long streams have
    # started gets all its tokens before they end
    server, url = served
    long_body = {"prompt": "hello", "max_tokens": 90, "temperature": 0, "ignore_eos": True}
    started = threading.Barrier(3)

    def pace():  # >= 90 x 20 ms for the long streams, so a loaded machine cannot outrun them
        time.sleep(0.02)

    server.engine.add_step_listener(pace)
    out = {}

    def run(i):
        out[i] = _stream_events(url, long_body, on_first=started.wait)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    started.wait(60)
    short = httpx.post(
        f"{url}/v1/completions",
        json={"prompt": "hi", "max_tokens": 2, "temperature": 0, "ignore_eos": True},
        timeout=60,
    )
    t_short = time.monotonic()
    for t in threads:
        t.join(60)
    server.engine.remove_step_listener(pace)
    assert short.json()["usage"]["completion_tokens"] == 2
    for events in out.values():
        assert events[-1][0]["choices"][0]["finish_reason"] == "length"
        assert events[-1][1] > t_short  # still streaming when the short one was done


def test_client_that_goes_away_frees_its_blocks(served):
    server, url = served
    aborted = server.engine.finished["abort"]
    body = {"prompt": "hello", "max_tokens": 90, "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as r:
        next(r.iter_lines())  # the first token, then hang up
    pool = server.engine.cache.pool
    deadline = time.monotonic() + 10
    while (server.engine.num_running or pool.free != pool.num_blocks) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.01)
    assert server.engine.num_running == 0 and pool.free == pool.num_blocks
    assert server.engine.finished["abort"] == aborted + 1  # dropped, not run to the end


def test_error_messages_stay_short(served):
    r = httpx.post(f"{served[1]}/v1/completions", json={"prompt": [0.5] * 5000}, timeout=30)
    assert r.status_code == 400 and len(r.json()["error"]["message"]) < 300


def test_a_failing_model_is_a_json_500_and_the_server_lives_on(served, monkeypatch):
    server, url = served

    def broken(*a):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(server.engine, "_forward", broken)
    body = {"prompt": "hi", "max_tokens": 3}
    for stream in (False, True):
        r = httpx.post(f"{url}/v1/completions", json=body | {"stream": stream}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error"
        assert "Traceback" not in r.text and "exploded" not in r.text
    monkeypatch.undo()
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("batched", [True, False], ids=["step-batched", "per-event"])
def test_mailbox_wakes_the_loop_once_per_step_and_keeps_each_queue_in_order(batched):
    from moeflow.serving.openai_api import _Mailbox

    loop = asyncio.new_event_loop()
    wakes = []
    real = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *a: (wakes.append(a), real(*a))[1]
    try:
        queues = [asyncio.Queue() for _ in range(3)]
        box = _Mailbox(loop, batched)
        before_flush = []

        def engine_step(first):  # another thread, as the engine's: 4 tokens per queue
            for t in range(first, first + 4):
                for q in queues:
                    box.put(q, t)
            before_flush.append(len(wakes))
            box.flush()

        for first in (0, 4):
            th = threading.Thread(target=engine_step, args=(first,))
            th.start()
            th.join()
            loop.run_until_complete(asyncio.sleep(0))  # the loop drains
        # one wake-up per step: at the flush (batched) or at the step's first put
        assert len(wakes) == 2
        assert before_flush == ([0, 1] if batched else [1, 2])
        for q in queues:
            assert [q.get_nowait() for _ in range(q.qsize())] == list(range(8))
        box.flush()  # nothing pending: no wake-up
        assert len(wakes) == 2
    finally:
        loop.close()
    box.put(queues[0], 9)
    box.flush()  # a closed loop: dropped, no error
