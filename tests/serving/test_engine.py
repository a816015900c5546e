"""Continuous batching (moeflow.serving.engine): same tokens as moeflow.models.generate
whatever the block size, chunking or batch; requests join while others decode; a request
waits for KV blocks and then completes; typed errors; draining shutdown."""

import threading
import time

import pytest
import torch

from moeflow.config import MoEConfig
from moeflow.errors import ConfigError, InputError
from moeflow.models import DecoderConfig, MoEDecoder, Request, SamplingParams, generate
from moeflow.serving.engine import Engine, EngineClosedError, EngineConfig
from moeflow.serving.kv_blocks import BlockPool, PagedKVCache, kv_bytes_per_token


def tiny_model(**attention) -> MoEDecoder:
    cfg = DecoderConfig(
        vocab_size=80,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        moe=MoEConfig(
            hidden_size=32, ffn_hidden_size=24, num_experts=4, top_k=2, num_shared_experts=1
        ),
        max_position_embeddings=48,
        **{"head_dim": 8, **attention},
    )
    torch.manual_seed(0)
    model = MoEDecoder(cfg).eval()
    with torch.no_grad():  # larger weights: logits that differ between tokens
        for p in model.parameters():
            p.mul_(1.5)
    return model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _requests(sampled: bool = False):
    g = torch.Generator().manual_seed(1)
    out = []
    for i, (plen, new) in enumerate([(1, 9), (7, 4), (13, 12), (4, 1), (22, 7)]):
        prompt = torch.randint(0, 80, (plen,), generator=g).tolist()
        params = SamplingParams(new, 0.8, 0.9, seed=100 + i) if sampled else SamplingParams(new)
        out.append(Request(prompt, params, i))
    return out


CONFIGS = [
    EngineConfig(block_size=16),
    EngineConfig(block_size=4, max_prefill_tokens=3),  # chunked prefill across steps
    EngineConfig(block_size=1, max_seqs=2),  # two at a time: the rest queue for a row
    EngineConfig(block_size=2, num_blocks=16),  # a small pool: requests queue for blocks
]


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"bs{c.block_size}")
def test_engine_matches_generate(model, cfg, sampled):
    reqs = _requests(sampled)
    ref = generate(model, reqs)
    eng = Engine(model, cfg)
    out = eng.generate(reqs)
    for o, r in zip(out, ref):
        assert o.ok and o.tokens == r.tokens and o.finish_reason == r.finish_reason
    assert eng.cache.pool.free == eng.cache.pool.num_blocks  # every block came back


def test_greedy_and_sampled_requests_in_one_step_match_generate(model):
    # greedy rows take the batched argmax, sampled rows their own generator, in one step
    reqs = [
        Request(r.prompt, SamplingParams(r.params.max_new_tokens, 0.8, 0.9, seed=7 + i), i)
        if i % 2
        else r
        for i, r in enumerate(_requests())
    ]
    ref = generate(model, reqs)
    out = Engine(model, EngineConfig(block_size=4)).generate(reqs)
    assert [o.tokens for o in out] == [r.tokens for r in ref]
    assert any(r.params.temperature > 0 for r in reqs) and any(
        r.params.temperature == 0 for r in reqs
    )


def test_step_listeners_follow_the_steps_callbacks(model):
    # a listener sees each step's tokens already delivered, and first tokens before the
    # decode of the same step runs
    eng = Engine(model, EngineConfig(block_size=4))
    log = []
    eng.add_step_listener(lambda: log.append(("step", eng.steps)))
    h = eng.submit([1, 2, 3], SamplingParams(3), on_token=lambda h, t: log.append(("tok", t)))
    eng.step()
    toks = h.result.tokens
    # step 1: prefill emits token 0 (listener), decode emits token 1 (listener)
    assert log == [("tok", toks[0]), ("step", 1), ("tok", toks[1]), ("step", 1)]
    eng.step()
    assert log[-2:] == [("tok", toks[2]), ("step", 2)] and h.done
    eng.remove_step_listener(eng._step_listeners[0])
    eng.generate([Request([4], SamplingParams(2))])
    assert log[-1] == ("step", 2)


def test_latent_attention_cache_matches_generate():
    m = tiny_model(
        attention="mla",
        kv_lora_rank=8,
        q_lora_rank=None,
        qk_nope_head_dim=8,
        v_head_dim=6,
        head_dim=4,
    )
    reqs = _requests()
    ref = generate(m, reqs)
    out = Engine(m, EngineConfig(block_size=3, max_prefill_tokens=5)).generate(reqs)
    assert [o.tokens for o in out] == [r.tokens for r in ref]


def test_late_request_joins_running_decodes(model):
    # Orca's iteration-level scheduling: a request submitted while others decode gets its
    # first token at the next step and finishes before them.
    eng = Engine(model, EngineConfig(block_size=4))
    a = eng.submit([1, 2, 3], SamplingParams(30))
    b = eng.submit([4, 5, 6, 7, 8], SamplingParams(30))
    for _ in range(5):
        eng.step()
    assert len(a.result.tokens) == 6 and eng.num_running == 2
    c = eng.submit([9, 10], SamplingParams(3))
    eng.step()
    assert eng.num_running == 3 and len(c.result.tokens) == 2  # prefill + decode, one step
    assert len(a.result.tokens) == 7  # a decoded in the same step
    eng.step()
    assert c.done and c.result.finish_reason == "length" and not a.done and not b.done
    ref = generate(model, [Request([9, 10], SamplingParams(3))])[0]
    assert c.result.tokens == ref.tokens
    while eng.step():
        pass
    assert a.done and b.done and eng.cache.pool.free == eng.cache.pool.num_blocks


def test_late_request_ttft_on_the_engine_thread(model):
    eng = Engine(model, EngineConfig(block_size=4)).start()
    try:
        long_ = [eng.submit([i + 1, i + 2], SamplingParams(45)) for i in range(2)]
        while len(long_[0].result.tokens) < 3:
            time.sleep(0.001)
        late = eng.submit([7, 8, 9], SamplingParams(2))
        res = late.wait(10)
        assert res.tokens == generate(model, [Request([7, 8, 9], SamplingParams(2))])[0].tokens
        # the late request finished while the long ones were still decoding
        for h in long_:
            h.wait(10)
            assert h.result.token_times[-1] > res.token_times[-1]
            assert len(h.result.tokens) == 45
    finally:
        eng.shutdown()


def test_request_waits_for_kv_blocks_then_completes(model):
    # pool of 4 blocks of 4 positions; a 9-token prompt takes 3 of them, so the second waits
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=4))
    reqs = [Request(list(range(1, 10)), SamplingParams(3)), Request([7] * 9, SamplingParams(3))]
    a, b = (eng.submit(r.prompt, r.params) for r in reqs)
    eng.step()
    assert eng.num_running == 1 and eng.num_waiting == 1 and eng.cache.pool.free == 1
    assert len(a.result.tokens) == 2 and b.result.tokens == []
    eng.step()
    assert a.done and b.result.tokens == [] and eng.num_waiting == 1  # admitted next step
    eng.step()
    assert eng.num_running == 1 and eng.num_waiting == 0 and len(b.result.tokens) == 2
    while eng.step():
        pass
    ref = generate(model, reqs)
    assert [a.result.tokens, b.result.tokens] == [r.tokens for r in ref]
    assert b.result.token_times[0] > a.result.token_times[-1]
    assert eng.cache.pool.free == 4 and eng.preemptions == 0


@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_preempted_request_recomputes_and_draws_the_same_tokens(model, sampled):
    # 6 blocks of 4: two requests of 5-6 prompt tokens fit at admission (2 blocks each), but
    # growing to 16 positions (4 blocks each) they do not; the newer one is preempted
    temp = 0.9 if sampled else 0.0
    reqs = [
        Request([3, 1, 4, 1, 5], SamplingParams(12, temp, seed=1)),
        Request([2, 7, 1, 8, 2, 8], SamplingParams(12, temp, seed=2)),
        Request([9, 9], SamplingParams(4, temp, seed=3)),
    ]
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=6))
    out = eng.generate(reqs)
    assert eng.preemptions >= 1
    assert [o.tokens for o in out] == [r.tokens for r in generate(model, reqs)]
    assert all(o.finish_reason == "length" for o in out)
    assert eng.cache.pool.free == 6


def test_typed_errors_at_submit(model):
    eng = Engine(model, EngineConfig(block_size=4, num_blocks=2))
    with pytest.raises(InputError, match="needs 3 KV blocks"):  # 3 + 8 - 1 positions
        eng.submit([1, 2, 3], SamplingParams(8))
    with pytest.raises(InputError, match="outside"):
        eng.submit([1, 99], SamplingParams(2))
    with pytest.raises(InputError, match="empty"):
        eng.submit([], SamplingParams(2))
    with pytest.raises(ConfigError, match="top_p"):
        eng.submit([1], SamplingParams(2, top_p=0.0))
    with pytest.raises(ConfigError, match="block_size"):
        Engine(model, EngineConfig(block_size=0))
    with pytest.raises(ConfigError, match="kv_cache_bytes"):
        Engine(model, EngineConfig(kv_cache_bytes=10))
    assert eng.num_waiting == 0


def test_kv_budget_in_bytes(model):
    per_tok = kv_bytes_per_token(model.cfg)
    assert per_tok == 2 * 2 * 2 * 8 * 4  # layers * (k, v) * kv heads * head dim * fp32
    eng = Engine(model, EngineConfig(block_size=8, kv_cache_bytes=per_tok * 8 * 5 + 7))
    assert eng.cache.pool.num_blocks == 5


def test_block_pool_all_or_nothing():
    pool = BlockPool(3)
    a = pool.allocate(2)
    assert pool.allocate(2) is None and pool.free == 1
    pool.release(a)
    assert sorted(pool.allocate(3)) == [0, 1, 2]


def test_paged_cache_reads_what_it_wrote(model):
    cache = PagedKVCache(model.cfg, num_blocks=6, block_size=2, max_seqs=2)
    cache.assign(0, [5, 1, 3])
    cache.assign(1, [0, 2])
    k = torch.randn(2, 3, 2, 8)
    v = torch.randn(2, 3, 2, 8)
    rows, pos = torch.tensor([0, 1]), torch.tensor([[2, 3, 4], [0, 1, 2]])
    kr, vr = cache.write_and_read(0, rows, pos, k, v, upto=5)
    assert kr.shape == (2, 2, 5, 8)
    assert torch.equal(kr[0, :, 2:5], k[0].transpose(0, 1))
    assert torch.equal(vr[1, :, 0:3], v[1].transpose(0, 1))
    # sequence 0's positions 2-3 are block 1, position 4 block 3
    assert torch.equal(cache.k[0][1 * 2 : 1 * 2 + 2], k[0, :2])
    assert torch.equal(cache.k[0][3 * 2], k[0, 2])


def test_abort_frees_blocks_and_shutdown_drains(model):
    eng = Engine(model, EngineConfig(block_size=4)).start()
    gone = eng.submit([1, 2], SamplingParams(40))
    gone.abort()
    assert gone.wait(10).finish_reason == "abort"
    hs = [eng.submit([i + 1] * (i + 1), SamplingParams(10 + i)) for i in range(4)]
    finished = []
    t = threading.Thread(target=eng.shutdown, kwargs={"drain": True, "timeout": 20})
    t.start()
    with pytest.raises(EngineClosedError):
        time.sleep(0.01)
        eng.submit([1], SamplingParams(1))
    t.join(25)
    finished = [h.result for h in hs if h.done]
    assert len(finished) == 4
    assert all(
        r.finish_reason == "length" and len(r.tokens) == 10 + i for i, r in enumerate(finished)
    )
    assert eng.cache.pool.free == eng.cache.pool.num_blocks


def test_default_pool_is_capped_by_memory_but_fits_one_sequence(model, monkeypatch):
    import moeflow.serving.engine as engine_mod

    per_seq = -(-model.cfg.max_position_embeddings // 4)  # 12 blocks of 4 for 48 positions
    assert Engine(model, EngineConfig(block_size=4, max_seqs=3)).cache.pool.num_blocks == 36
    block = 4 * kv_bytes_per_token(model.cfg)
    monkeypatch.setattr(engine_mod, "default_kv_cache_bytes", lambda device: 20 * block)
    assert Engine(model, EngineConfig(block_size=4, max_seqs=3)).cache.pool.num_blocks == 20
    monkeypatch.setattr(engine_mod, "default_kv_cache_bytes", lambda device: block)
    assert Engine(model, EngineConfig(block_size=4)).cache.pool.num_blocks == per_seq


def test_a_failing_step_ends_its_requests_not_the_engine(model, monkeypatch):
    from moeflow.serving.engine import EngineError

    eng = Engine(model, EngineConfig(block_size=4)).start()
    try:
        real = eng._forward
        calls = {"n": 0}

        def flaky(*a):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("device lost")
            return real(*a)

        monkeypatch.setattr(eng, "_forward", flaky)
        hit = eng.submit([1, 2, 3], SamplingParams(10))
        res = hit.wait(10)
        assert res.finish_reason == "error" and isinstance(res.error, EngineError)
        assert "device lost" in str(res.error)
        after = eng.submit([1, 2, 3], SamplingParams(5)).wait(10)
        assert (
            after.ok
            and after.tokens == generate(model, [Request([1, 2, 3], SamplingParams(5))])[0].tokens
        )
        assert eng.cache.pool.free == eng.cache.pool.num_blocks
    finally:
        eng.shutdown()


def test_padded_prefill_never_runs_past_the_context(model):
    # step 2 prefills a's last 8 prompt tokens (positions 32-39) and b's 20: padded to 20,
    # a's row would reach position 51 of a 48-position context, so a runs in its own call
    eng = Engine(model, EngineConfig(block_size=4, max_prefill_tokens=32))
    reqs = [Request([5] * 40, SamplingParams(8)), Request(list(range(1, 21)), SamplingParams(5))]
    a = eng.submit(reqs[0].prompt, reqs[0].params)
    eng.step()
    assert a.result.tokens == []  # 32 of 40 prompt tokens in the cache
    b = eng.submit(reqs[1].prompt, reqs[1].params)
    calls = []
    real = eng._forward
    eng._forward = lambda ids, rows, starts: calls.append(len(ids[0])) or real(ids, rows, starts)
    eng.step()
    assert sorted(calls[:2]) == [8, 20] and len(a.result.tokens) >= 1 and b.result.tokens
    while eng.step():
        pass
    assert [a.result.tokens, b.result.tokens] == [r.tokens for r in generate(model, reqs)]
