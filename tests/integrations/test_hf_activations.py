"""transformers MoE blocks with each supported ``hidden_act``: the converted layer computes the
same outputs and gradients (routed and shared experts)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_hf import COMMON, VOCAB, _randomize  # noqa: E402

from moeflow.errors import UnsupportedModelError  # noqa: E402
from moeflow.integrations.hf import from_hf_block, patch_model  # noqa: E402

HIDDEN_ACTS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def _qwen2_block(hidden_act: str):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = transformers.Qwen2MoeConfig(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=8,
        num_experts_per_tok=2,
        hidden_act=hidden_act,
    )
    block = Qwen2MoeSparseMoeBlock(cfg).float().train()
    _randomize(block, seed=17)
    return block


@pytest.mark.parametrize(
    "hidden_act",
    [
        pytest.param(a, marks=pytest.mark.slow) if a == "silu" else a  # silu: covered in test_hf
        for a in sorted(HIDDEN_ACTS)
    ],
)
def test_block_with_activation_matches(hidden_act):
    block = _qwen2_block(hidden_act)
    layer = from_hf_block(block)
    assert layer.cfg.expert_activation == HIDDEN_ACTS[hidden_act]
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(5))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref, y = block(x1), layer(x2)
    assert y_ref.abs().max() > 1e-2
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        layer.experts.w_in.grad, block.experts.gate_up_proj.grad, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        layer.shared.w_out.grad, block.shared_expert.down_proj.weight.grad, atol=1e-5, rtol=1e-5
    )


def test_mixed_activations_refused():
    block = _qwen2_block("gelu")
    block.shared_expert.act_fn = torch.nn.ReLU()
    with pytest.raises(UnsupportedModelError, match="shared-expert activation relu"):
        from_hf_block(block)
    block.experts.act_fn = torch.nn.Tanh()
    with pytest.raises(UnsupportedModelError, match="Tanh"):
        from_hf_block(block)


def test_gelu_model_patched_logits_match():
    cfg = transformers.MixtralConfig(
        **COMMON,
        intermediate_size=48,
        num_local_experts=6,
        num_experts_per_tok=2,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).float().eval()
    _randomize(model, seed=3)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        patch_model(model)
        after = model(input_ids=ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)
