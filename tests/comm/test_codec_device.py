"""Compression on a device tensor is a ConfigError naming ``compress``, decided before any
communication, never raw bytes sent under a compression setting (ZipCCL's collectives here
encode on the CPU). A CPU tensor subclass that reports a CUDA device stands in for a GPU."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moeflow.comm import compressed
from moeflow.comm.compressed import Compression, codec_device_error
from moeflow.errors import ConfigError


class _FakeCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True

    @property
    def device(self):
        return torch.device("cuda", 0)


def fake_cuda(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(_FakeCuda, t)


def test_fake_tensor_reports_cuda():
    t = fake_cuda(torch.randn(3, 2))
    assert t.is_cuda and t.device.type == "cuda" and t.is_floating_point()


@pytest.mark.parametrize("mode", [True, "auto"])
def test_decision_refuses_a_compressing_mode_on_cuda(mode):
    err = codec_device_error(mode, torch.device("cuda", 0), "test a2a")
    assert isinstance(err, ConfigError)
    assert err.field == "compress" and err.value == mode
    assert "CPU tensors only" in err.allowed and "test a2a" in err.allowed


def test_decision_allows_cpu_and_no_compression():
    assert codec_device_error(True, "cpu", "x") is None
    assert codec_device_error(Compression(True), torch.device("cpu"), "x") is None
    assert codec_device_error(False, "cuda", "x") is None
    assert codec_device_error(None, "cuda", "x") is None
    # the module's own collectives stage host buffers whatever the mode
    err = codec_device_error(Compression(False), "cuda", "x", any_mode=True)
    assert isinstance(err, ConfigError) and err.value is False


def _record(calls, name):
    def fn(*a, **kw):
        calls.append(name)
        raise AssertionError(f"{name} must not run")

    return fn


def test_comm_step_refuses_a_cuda_buffer(monkeypatch):
    from moeflow.parallel import contract

    calls = []
    monkeypatch.setattr(contract, "all_to_all_v", _record(calls, "raw all_to_all_v"))
    monkeypatch.setattr(compressed, "_all_to_all_begin", _record(calls, "compressed all_to_all"))
    step = contract.CommStep("dispatch", None, [2], [2], compression=Compression(True))
    with pytest.raises(ConfigError, match="compress"):
        step.issue(fake_cuda(torch.randn(2, 4)), 5.0)
    assert calls == []  # neither raw bytes nor the CPU codec
    # the same step on a CPU buffer reaches the compressed all-to-all (the setup is live;
    # it runs on the group's worker thread, its error surfaces at the wait)
    with pytest.raises(AssertionError, match="compressed all_to_all"):
        step.issue(torch.randn(2, 4), 5.0).wait()
    assert calls == ["compressed all_to_all"]


@pytest.mark.parametrize("fn", ["all_to_all", "all_gather", "reduce_scatter", "all_reduce"])
def test_compressed_collectives_refuse_cuda_before_any_communication(fn, monkeypatch):
    calls = []
    monkeypatch.setattr(compressed, "_group_size", _record(calls, "group size"))
    x = fake_cuda(torch.randn(4, 3))
    kw = {"in_splits": [4], "out_splits": [4]} if fn == "all_to_all" else {}
    with pytest.raises(ConfigError, match="compress"):
        getattr(compressed, fn)(x, **kw, group=None, compress=True)
    assert calls == []


def test_ddp_hook_refuses_cuda_parameters_at_registration():
    from moeflow.comm.hooks import register_comm_hook

    class Model:
        registered = []

        def parameters(self):
            return iter([fake_cuda(torch.randn(3))])

        def register_comm_hook(self, state, hook):
            self.registered.append(hook)

    m = Model()
    for mode in (True, False):
        with pytest.raises(ConfigError, match="compress"):
            register_comm_hook(m, mode)
    assert m.registered == []


def test_fsdp_collectives_refuse_cuda(monkeypatch):
    from moeflow.comm import hooks

    calls = []
    for name in ("all_gather_single", "all_gather_into_tensor"):
        monkeypatch.setattr(dist, name, lambda *a, **kw: calls.append("ag"), raising=False)
    for name in ("reduce_scatter_single", "reduce_scatter_tensor"):
        monkeypatch.setattr(dist, name, lambda *a, **kw: calls.append("rs"), raising=False)
    ag, rs = hooks._make_fsdp_comms(Compression(True))
    x = fake_cuda(torch.randn(8))
    with pytest.raises(ConfigError, match="compress"):
        ag(torch.empty(16), x, None)
    with pytest.raises(ConfigError, match="compress"):
        rs(torch.empty(4), x, None, dist.ReduceOp.SUM)
    assert calls == []  # no plain collective either
    # a non-float CPU buffer still takes the plain collective (the patch is live)
    ag(torch.empty(16, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8), None)
    assert calls == ["ag"]
