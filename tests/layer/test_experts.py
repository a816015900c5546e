"""Experts with each activation, gated (GLU) and plain, against a per-row reference; the
traceable (torch.compile / export) path against the eager one."""

from __future__ import annotations

import math

import pytest
import torch

from moeflow import MoELayer
from moeflow.config import EXPERT_ACTIVATIONS, MoEConfig
from moeflow.errors import ConfigError
from moeflow.layer.experts import Experts

E, D, F = 4, 16, 12
COUNTS = [3, 0, 5, 2]  # an empty expert included


def _act_ref(name: str, x: torch.Tensor) -> torch.Tensor:
    """The activations written out from their formulas."""
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))
    if name == "gelu_tanh":
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    assert name == "relu"
    return x.clamp_min(0)


def _reference(x_ND, w_in, w_out, act, gated):
    rows = []
    e_of_row = torch.arange(E).repeat_interleave(torch.tensor(COUNTS))
    for n in range(x_ND.shape[0]):
        e = int(e_of_row[n])
        h = w_in[e] @ x_ND[n]
        a = _act_ref(act, h[:F]) * h[F:] if gated else _act_ref(act, h)
        rows.append(w_out[e] @ a)
    return torch.stack(rows)


def _experts(act, gated, seed=0):
    torch.manual_seed(seed)
    return Experts(E, D, F, "swiglu" if gated else "gelu", activation=act)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("act", EXPERT_ACTIVATIONS)
def test_experts_match_reference(act, gated):
    ex = _experts(act, gated)
    assert ex.activation == act and act in repr(ex)
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(1))
    counts = torch.tensor(COUNTS)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y = ex(x1, counts)
    w_in = ex.w_in.detach().clone().requires_grad_()
    w_out = ex.w_out.detach().clone().requires_grad_()
    y_ref = _reference(x2, w_in, w_out, act, gated)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex.w_in.grad, w_in.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ex.w_out.grad, w_out.grad, atol=1e-5, rtol=1e-5)
    assert ex.w_in.grad[1].abs().sum() == 0  # the empty expert gets a zero gradient


@pytest.mark.parametrize("act,gated", [("silu", True), ("gelu", True), ("relu", False)])
def test_traceable_path_equals_eager(act, gated):
    ex = _experts(act, gated, seed=3)
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(4))
    counts = torch.tensor(COUNTS)
    y = ex(x, counts)
    torch.testing.assert_close(ex._forward_traceable(x, counts), y, atol=1e-5, rtol=1e-5)


def test_defaults_keep_each_expert_type_activation():
    assert Experts(E, D, F).activation == "silu"
    assert Experts(E, D, F, "gelu").activation == "gelu_tanh"
    cfg = MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E)
    assert cfg.expert_activation == "silu" and cfg.activation is None
    with pytest.raises(ConfigError, match="activation.*'tanh'"):
        MoEConfig(hidden_size=D, ffn_hidden_size=F, num_experts=E, activation="tanh")
    with pytest.raises(ConfigError, match="activation"):
        Experts(E, D, F, activation="swish")


def test_layer_with_geglu_shared_experts():
    """A layer's shared experts use the layer's activation too."""
    cfg = MoEConfig(
        hidden_size=D,
        ffn_hidden_size=F,
        num_experts=E,
        top_k=2,
        activation="gelu",
        num_shared_experts=1,
    )
    torch.manual_seed(0)
    layer = MoELayer(cfg)
    assert layer.experts.activation == layer.shared.activation == "gelu"
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(2))
    s = layer.shared
    h = x @ s.w_in.t()
    want = (_act_ref("gelu", h[:, :F]) * h[:, F:]) @ s.w_out.t()
    torch.testing.assert_close(s(x), want, atol=1e-5, rtol=1e-5)
    silu = MoELayer(cfg.replace(activation=None))
    silu.load_state_dict(layer.state_dict())
    assert not torch.allclose(silu(x), layer(x), atol=1e-4)  # the activation is used


@pytest.mark.parametrize(
    "act,gated", [("silu", True), ("gelu", True), ("gelu_tanh", False), ("relu", False)]
)
def test_compiled_experts_match_eager(act, gated):
    """Under torch.compile (fullgraph) the experts are the custom op: same outputs and
    gradients as eager, with the hand-written backward."""
    ex = _experts(act, gated, seed=5)
    x = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(6))
    counts = torch.tensor(COUNTS)
    g = torch.randn(sum(COUNTS), D, generator=torch.Generator().manual_seed(7))
    results = []
    for fn in (ex, torch.compile(ex, fullgraph=True, backend="aot_eager")):
        ex.zero_grad()
        xi = x.clone().requires_grad_()
        y = fn(xi, counts)
        (y * g).sum().backward()
        results.append((y.detach(), xi.grad, ex.w_in.grad.clone(), ex.w_out.grad.clone()))
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert results[1][2][1].abs().sum() == 0  # the empty expert


def test_experts_op_registration():
    """Schema, fake (meta) shapes and autograd registration of moeflow::experts_ffn."""
    from moeflow.layer.experts import experts_ffn_op

    ex = _experts("gelu", True, seed=8)
    x = torch.randn(sum(COUNTS), D, requires_grad=True)
    torch.library.opcheck(
        experts_ffn_op, (x, torch.tensor(COUNTS), ex.w_in, ex.w_out, "gelu", True, "auto")
    )
