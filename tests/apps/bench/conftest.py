"""Tiny workloads shared by the bench tests (one thread, so timings are steady)."""

import pytest
import torch

TINY = {
    "dim": 32,
    "num_layers": 1,
    "num_heads": 4,
    "num_experts": 4,
    "top_k": 2,
    "ffn_hidden_size": 64,
}


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def demo_train():
    """A dissected demo training step at the tiny shape (kernel grouped_mm, fp32)."""
    from moeflow.apps.bench import Setting, Shape, build_workload, dissect

    torch.set_num_threads(1)
    w = build_workload("demo", "train", Setting(), Shape(batch=4, seq_len=32), dims=TINY)
    return w, dissect(w, warmup=1, steps=3, unprofiled=2, keep_trace=True)
