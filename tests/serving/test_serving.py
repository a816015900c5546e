"""Disaggregated serving (AG + EG ranks on gloo): every schedule reproduces single-process
generation; layout errors before communication; a dying EG rank is a CommTimeoutError."""

import os

import pytest
import torch

from moeflow.config import MoEConfig
from moeflow.errors import CommTimeoutError, ConfigError, DistributedConfigError, InputError
from moeflow.models import DecoderConfig, MoEDecoder, Request, SamplingParams, generate
from moeflow.serving.disaggregated import ServeSchedule, header_size, serve, serve_rank
from tests._dist import run_ranks

SCHEDULES = [
    ServeSchedule.naive(),
    ServeSchedule.pppipe(),
    ServeSchedule("findep", 2, 3, "AASS"),
    ServeSchedule("findep", 3, 2, "ASAS"),
]


def tiny_model(shared: int = 1, **attention) -> MoEDecoder:
    attention = {"head_dim": 8, **attention}
    cfg = DecoderConfig(
        vocab_size=80,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        moe=MoEConfig(
            hidden_size=32, ffn_hidden_size=24, num_experts=4, top_k=2, num_shared_experts=shared
        ),
        max_position_embeddings=40,
        **attention,
    )
    torch.manual_seed(0)
    model = MoEDecoder(cfg).eval()
    with torch.no_grad():  # larger weights: routing and logits that differ between tokens
        for p in model.parameters():
            p.mul_(1.5)
    return model


def requests():
    g = torch.Generator().manual_seed(1)
    ps = [torch.randint(1, 80, (n,), generator=g).tolist() for n in (7, 2, 11, 4, 5)]
    return [
        Request(ps[0], SamplingParams(6)),
        Request(ps[1], SamplingParams(8)),
        Request([], SamplingParams(4), "empty"),
        Request(ps[2], SamplingParams(5, temperature=0.9, top_p=0.8, seed=7)),
        Request(ps[3], SamplingParams(6)),
        Request(ps[4], SamplingParams(3)),
    ]


def reference(model, reqs):
    """Single-process generation with one thread, as each rank runs (the GEMMs' summation
    order then matches)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return generate(model, reqs, return_logits=True)
    finally:
        torch.set_num_threads(n)


def check_same(ref, got):
    for a, b in zip(ref, got):
        assert a.tokens == b.tokens and a.finish_reason == b.finish_reason
        assert (a.error is None) == (b.error is None)
        for x, y in zip(a.logits, b.logits):
            torch.testing.assert_close(y, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("eg", [1, 2])
def test_every_schedule_matches_single_process(eg):
    model, reqs = tiny_model(), requests()
    ref = reference(model, reqs)
    assert isinstance(ref[2].error, InputError) and len(ref[0].tokens) == 6
    for s in SCHEDULES:
        got = serve(model, reqs, ag=1, eg=eg, schedule=s, return_logits=True, timeout_s=30)
        check_same(ref, got)


def test_two_attention_ranks_without_shared_experts():
    model, reqs = tiny_model(shared=0), requests()
    ref = reference(model, reqs)
    got = serve(
        model,
        reqs,
        ag=2,
        eg=2,
        schedule=ServeSchedule("findep", 2, 2, "AASS"),
        return_logits=True,
        timeout_s=30,
    )
    check_same(ref, got)


def test_latent_attention_model_serves_the_same():
    model = tiny_model(
        attention="mla",
        q_lora_rank=12,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        v_head_dim=6,
        head_dim=4,
    )
    reqs = requests()
    ref = reference(model, reqs)
    got = serve(
        model,
        reqs,
        ag=1,
        eg=2,
        schedule=ServeSchedule("findep", 2, 2, "ASAS"),
        return_logits=True,
        timeout_s=30,
    )
    check_same(ref, got)


def test_layout_errors_before_any_communication():
    model = tiny_model()
    # no process group exists here: reaching any transfer would fail differently
    with pytest.raises(DistributedConfigError, match="world"):
        serve_rank(0, 3, model, requests(), 1, 1, ServeSchedule.naive())
    with pytest.raises(DistributedConfigError, match="num_experts=4"):
        serve(model, requests(), ag=1, eg=3)
    with pytest.raises(DistributedConfigError, match="eg=0"):
        serve(model, requests(), ag=1, eg=0)
    with pytest.raises(ConfigError, match="schedule"):
        ServeSchedule("greedy")
    with pytest.raises(ConfigError, match="r1"):
        ServeSchedule("findep", 0)
    with pytest.raises(ConfigError, match="order"):
        ServeSchedule("findep", 2, 2, "SASA")
    with pytest.raises(ConfigError):
        ServeSchedule("pppipe", 2, 4)


def _dying_expert_rank(rank, world, model, reqs):
    import torch.distributed as dist

    if rank == 1:  # the EG rank takes the first header, then dies
        dist.recv(torch.empty(header_size(4), dtype=torch.long), 0)
        os._exit(1)
    try:
        serve_rank(rank, world, model, reqs, 1, 1, ServeSchedule.pppipe(), timeout_s=5.0)
    except CommTimeoutError as e:
        return str(e)
    return "no error"


def test_dying_expert_rank_is_a_timeout_naming_the_transfer():
    out = run_ranks(_dying_expert_rank, 2, tiny_model(), requests(), expect_exit={1}, timeout_s=60)
    assert "e2a from EG rank 1" in out[0] and "layer 0" in out[0], out[0]


def test_bad_sampling_params_fail_alone_like_generate():
    """A request with out-of-range sampling parameters gets its typed error back from the
    rank (the error crosses the process boundary) and the others are served."""
    model, reqs = tiny_model(), requests()
    reqs += [
        Request([3, 4], SamplingParams(0), "zero"),
        Request([3, 4], SamplingParams(4, temperature=float("nan")), "nan"),
        Request([3, 4], SamplingParams(4, temperature=0.5, top_p=0.0), "top_p"),
    ]
    ref = reference(model, reqs)
    got = serve(model, reqs, ag=2, eg=1, return_logits=True, timeout_s=30)
    check_same(ref, got)
    fields = [(r.error.field, r.finish_reason) for r in got[-3:]]
    assert fields == [("max_new_tokens", "error"), ("temperature", "error"), ("top_p", "error")]
    assert all(isinstance(r.error, ConfigError) for r in got[-3:])
    assert [len(r.tokens) for r in got[:2]] == [6, 8]


def test_only_bad_requests_start_no_rank(monkeypatch):
    import moeflow.launch

    def no_launch(*a, **k):
        raise AssertionError("no rank should start when every request is bad")

    monkeypatch.setattr(moeflow.launch, "launch", no_launch)
    reqs = [Request([], SamplingParams(2), "e"), Request([1], "x"), Request(5, request_id="i")]
    got = serve(tiny_model(), reqs)
    assert [type(r.error) for r in got] == [InputError, ConfigError, InputError]
    assert [r.request_id for r in got] == ["e", None, "i"] and not any(r.tokens for r in got)


def _traced_rank(rank, world, model, reqs, ag, eg, schedule):
    """serve_rank with every point-to-point call recorded: (peer, "send" / "recv", shape,
    dtype, tag), and any-source receives flagged."""
    import threading

    import torch.distributed as dist

    log, lock = [], threading.Lock()
    real_isend, real_irecv = dist.isend, dist.irecv

    def isend(t, dst, *a, tag=0, **k):
        with lock:
            log.append((dst, "send", tuple(t.shape), str(t.dtype), tag))
        return real_isend(t, dst, *a, tag=tag, **k)

    def irecv(t, src=None, *a, tag=0, **k):
        with lock:
            log.append((src, "recv", tuple(t.shape), str(t.dtype), tag))
        return real_irecv(t, src, *a, tag=tag, **k)

    dist.isend, dist.irecv = isend, irecv
    try:
        serve_rank(rank, world, model, reqs, ag, eg, schedule, timeout_s=30.0)
    finally:
        dist.isend, dist.irecv = real_isend, real_irecv
    return log


@pytest.mark.parametrize(
    "ag,eg,schedule",
    [(1, 2, ServeSchedule("findep", 2, 3, "ASAS")), (2, 2, ServeSchedule("findep", 3, 2, "AASS"))],
)
def test_every_pair_posts_one_sequence_on_both_sides(ag, eg, schedule):
    """NCCL matches a pair's messages by position (it ignores tags and has no any-source
    receive) and runs them in the order posted, so both sides of every pair must post the
    same sequence: each send opposite a receive of the same shape and dtype, in the same
    place. Checked on the calls the ranks make while serving."""
    model, reqs = tiny_model(), requests()
    reqs = [r for r in reqs if r.prompt]  # bad requests never reach a transfer
    logs = run_ranks(_traced_rank, ag + eg, model, reqs, ag, eg, schedule, timeout_s=120)
    flip = {"send": "recv", "recv": "send"}
    chunked = 0
    for a in range(ag):
        for e in range(ag, ag + eg):
            mine = [(k, s, d) for p, k, s, d, _ in logs[a] if p == e]
            theirs = [(flip[k], s, d) for p, k, s, d, _ in logs[e] if p == a]
            assert mine and mine == theirs, (a, e)
            # a group's other headers travel in one message of (chunks - 1) rows
            chunked += sum(
                1 for k, s, d in mine if k == "send" and d == "torch.int64" and len(s) == 2
            )
    assert chunked > 0
    for log in logs:
        assert all(p is not None and tag == 0 for p, *_, tag in log)
