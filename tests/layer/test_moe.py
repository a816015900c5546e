"""MoELayer against a dense per-token reference, and its input contract."""

import pytest
import torch
import torch.nn.functional as F

from moeflow import MoEConfig, MoELayer
from moeflow.errors import ConfigError, InputError, RoutingError

D, FF, E = 16, 24, 6


def _cfg(**kw):
    base = dict(hidden_size=D, ffn_hidden_size=FF, num_experts=E, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def dense_reference(layer, x_TD):
    """Per token: sum over its assignments of w * expert(x) (+ shared), no grouping tricks."""
    routing = layer.route(x_TD)
    ex = layer.experts
    out = torch.zeros_like(x_TD)
    for t, e, w in zip(
        routing.token_idx_N.tolist(), routing.expert_idx_N.tolist(), routing.weight_N
    ):
        h = ex.w_in[e] @ x_TD[t]
        if ex.expert_type == "swiglu":
            g, u = h.chunk(2)
            a = F.silu(g) * u
        else:
            a = F.gelu(h, approximate="tanh")
        out[t] = out[t] + w * (ex.w_out[e] @ a)
    if layer.shared is not None:
        out = out + layer.shared(x_TD)
    return out


CASES = [
    dict(router="softmax_topk"),
    dict(router="softmax_topk", expert_type="gelu", norm_topk_prob=False),
    dict(router="switch", top_k=1, capacity_factor=1.0),
    dict(router="sigmoid"),
    dict(router="xmoe"),
    dict(router="expert_choice"),
    dict(
        router="deepseek",
        n_group=3,
        topk_group=2,
        score_func="sigmoid",
        correction_bias=True,
        num_shared_experts=2,
        routed_scaling_factor=2.5,
    ),
    dict(
        router="softmax_topk",
        num_shared_experts=1,
        shared_ffn_hidden_size=8,
        shared_expert_gate="sigmoid",
    ),
    dict(router="softmax_topk", capacity_factor=0.5),
]


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
@pytest.mark.parametrize("kernel", ["grouped_mm", "bmm", "loop"])
def test_layer_matches_dense_reference_fwd_bwd(kw, kernel):
    torch.manual_seed(0)
    layer = MoELayer(_cfg(kernel=kernel, **kw))
    if layer.shared is not None and layer.shared.gate is not None:
        torch.nn.init.normal_(layer.shared.gate)
    x = torch.randn(2, 9, D, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    x2 = x.detach().clone().requires_grad_(True)
    ref = dense_reference(layer, x2.reshape(-1, D)).reshape(x.shape)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad(y, [x] + params, g, allow_unused=True)
    ref_grads = torch.autograd.grad(ref, [x2] + params, g, allow_unused=True)
    for a, b in zip(grads, ref_grads):
        if a is None or b is None:
            assert (a is None or a.abs().sum() == 0) and (b is None or b.abs().sum() == 0)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_any_leading_shape_and_1d():
    layer = MoELayer(_cfg())
    for shape in [(D,), (5, D), (2, 3, D), (2, 1, 2, D)]:
        x = torch.randn(*shape)
        assert layer(x).shape == x.shape
    x = torch.randn(2, 3, D)
    torch.testing.assert_close(layer(x).reshape(6, D), layer(x.reshape(6, D)))


def test_empty_batch():
    layer = MoELayer(_cfg(num_shared_experts=1))
    x = torch.randn(0, 7, D, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 7, D)
    assert float(layer.aux_loss) == 0.0
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_all_tokens_to_one_expert():
    torch.manual_seed(0)
    layer = MoELayer(_cfg(top_k=1, router="softmax_topk"))
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[3] = 1.0
    x = torch.rand(20, D) + 0.1  # positive, so expert 3 always has the top logit
    y = layer(x)
    assert layer.last_counts_E.tolist() == [0, 0, 0, 20, 0, 0]
    torch.testing.assert_close(y, dense_reference(layer, x), rtol=1e-5, atol=1e-6)


def test_dropped_tokens_contribute_zero():
    torch.manual_seed(0)
    layer = MoELayer(_cfg(router="switch", top_k=1, capacity_factor=0.25))
    x = torch.randn(40, D)
    y = layer(x)
    routing = layer.route(x)
    kept = set(routing.token_idx_N.tolist())
    dropped = [t for t in range(40) if t not in kept]
    assert dropped, "capacity 0.25 must drop tokens"
    assert torch.all(y[dropped] == 0)


def test_kernels_agree_in_bf16():
    torch.manual_seed(0)
    cfg = _cfg()
    ref = MoELayer(cfg.replace(kernel="loop")).to(torch.bfloat16)
    x = torch.randn(33, D, dtype=torch.bfloat16)
    y_ref = ref(x)
    for k in ("grouped_mm", "bmm"):
        other = MoELayer(cfg.replace(kernel=k)).to(torch.bfloat16)
        other.load_state_dict(ref.state_dict())
        y = other(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)


def test_wrong_hidden_size_raises():
    with pytest.raises(InputError, match="hidden_size=16"):
        MoELayer(_cfg())(torch.randn(4, D + 1))


def test_non_float_input_raises():
    with pytest.raises(InputError, match="dtype"):
        MoELayer(_cfg())(torch.ones(4, D, dtype=torch.long))


def test_top_k_above_num_experts_raises_value_error():
    with pytest.raises(ValueError, match="top_k"):
        _cfg(top_k=E + 1)
    with pytest.raises(ConfigError) as info:
        _cfg(top_k=E + 1)
    assert info.value.field == "top_k"


def test_nan_input_raises_routing_error():
    x = torch.randn(4, D)
    x[2, 5] = float("nan")
    with pytest.raises(RoutingError):
        MoELayer(_cfg())(x)
    assert issubclass(RoutingError, ValueError) and issubclass(InputError, ValueError)


def test_aux_loss_is_in_graph():
    layer = MoELayer(_cfg(aux_loss_coef=0.1))
    layer(torch.randn(10, D))
    assert layer.aux_loss.requires_grad
    layer.aux_loss.backward()
    assert layer.router.weight.grad.abs().sum() > 0


def test_router_dtype_input_matches_bf16_gemm():
    torch.manual_seed(0)
    cfg = _cfg(router_dtype="input")
    layer = MoELayer(cfg).to(torch.bfloat16)
    x = torch.randn(40, D, dtype=torch.bfloat16)
    logits = layer.router.logits(x)
    assert logits.dtype == torch.float32
    want = torch.nn.functional.linear(x, layer.router.weight).float()
    assert torch.equal(logits, want)
    fp32 = MoELayer(cfg.replace(router_dtype="float32")).to(torch.bfloat16)
    fp32.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fp32.router.logits(x), x.float() @ fp32.router.weight.float().t())


def test_deepcopy_and_averaged_model_after_grad_forward():
    import copy
    import pickle

    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    layer = MoELayer(_cfg(aux_loss_coef=0.1))
    model = torch.nn.Sequential(torch.nn.Linear(D, D), layer)
    x = torch.randn(12, D)
    y = model(x)
    assert layer.aux_loss.requires_grad  # graph-attached: this used to break deepcopy
    twin = copy.deepcopy(model)
    assert not twin[1].aux_loss.requires_grad
    assert torch.equal(twin[1].aux_loss, layer.aux_loss.detach())
    assert torch.equal(twin(x), y.detach())  # same weights, independent copy
    swa = AveragedModel(model)
    swa.update_parameters(model)
    assert torch.allclose(swa(x), y.detach())
    assert pickle.loads(pickle.dumps(layer)).aux_loss.item() == pytest.approx(layer.aux_loss.item())
    # the original still carries the gradient into the user's loss
    (y.sum() + layer.aux_loss).backward()
    assert layer.router.weight.grad is not None
