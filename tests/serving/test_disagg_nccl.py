"""Disaggregated serving on NCCL ranks, one GPU each (``device="cuda"``): greedy tokens over
HTTP equal :func:`moeflow.models.generate` on the same GPU, under a fixed chunked FinDEP
schedule and naive DEP. Needs two GPUs (NCCL refuses two ranks on one device); skipped
elsewhere, run by ``benchmarks/gpu/run_all.sh`` where a host has them. The protocol's
NCCL-safety (one message sequence per pair, no tags, no any-source receive) is checked on
gloo ranks in ``test_serving.py``."""

import pytest
import torch

from moeflow.models import Request, SamplingParams, generate

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs two GPUs (one NCCL rank each)",
)


@pytest.mark.parametrize("schedule", ["naive", "findep 2x2"])
def test_greedy_tokens_over_http_equal_generate_on_nccl_ranks(checkpoint, schedule):
    import torch.distributed as dist

    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    from moeflow.checkpoint import load_pretrained
    from moeflow.serving.disagg_server import disaggregated_server
    from moeflow.serving.disaggregated import ServeSchedule
    from moeflow.serving.engine import EngineConfig
    from moeflow.serving.openai_api import build_app
    from tests.serving.serving_live import LiveServer, greedy_token_ids

    sched = "naive" if schedule == "naive" else ServeSchedule("findep", 2, 2, "ASAS")
    server = disaggregated_server(
        checkpoint[1],
        EngineConfig(block_size=4, max_seqs=8, max_prefill_tokens=16),
        "tiny",
        ag=1,
        eg=1,
        schedule=sched,
        device="cuda",
        timeout_s=60,
    )
    prompts = [[5, 6, 7, 8, 9][: 2 + i % 4] + [10 + i] for i in range(4)]
    lens = [4, 12, 7, 9]
    try:
        with LiveServer(build_app(server)) as live:
            got = [greedy_token_ids(live.url, p, n) for p, n in zip(prompts, lens)]
    finally:
        server.engine.shutdown(drain=False)
    full = load_pretrained(checkpoint[1]).to("cuda:0")
    ref = generate(full, [Request(p, SamplingParams(n)) for p, n in zip(prompts, lens)])
    assert got == [r.tokens for r in ref]
