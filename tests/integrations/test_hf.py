"""transformers integration: converted blocks and patched models compute what transformers does.

Tiny random models are built from config objects (nothing is downloaded); every weight,
including the router and DeepSeek-V3's correction bias, is randomised so that routing is
non-trivial. fp32, eval mode: full-model logits must agree within 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

transformers = pytest.importorskip("transformers")

from moeflow import MoELayer  # noqa: E402
from moeflow.errors import UnsupportedModelError  # noqa: E402
from moeflow.integrations.hf import from_hf_block, is_moe_block, patch_model, supported_classes  # noqa: E402

VOCAB = 97
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def _mixtral():
    return transformers.MixtralConfig(
        **COMMON, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2
    )


def _qwen3():
    return transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def _qwen3_nonorm():
    return transformers.Qwen3MoeConfig(
        **COMMON,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=3,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    )


def _qwen2():
    return transformers.Qwen2MoeConfig(
        **COMMON,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def _olmoe():
    return transformers.OlmoeConfig(
        **COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False
    )


def _granite():
    return transformers.GraniteMoeConfig(
        **COMMON, intermediate_size=24, num_local_experts=6, num_experts_per_tok=2
    )


_MLA = dict(
    COMMON,
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=4,
    v_head_dim=8,
    qk_nope_head_dim=8,
)


def _dsv2(method="group_limited_greedy"):
    return transformers.DeepseekV2Config(
        **_MLA,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        topk_method=method,
        routed_scaling_factor=1.7,
        first_k_dense_replace=1,
    )


def _dsv3():
    return transformers.DeepseekV3Config(
        **_MLA,
        intermediate_size=48,
        moe_intermediate_size=16,
        n_routed_experts=16,
        n_shared_experts=1,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        first_k_dense_replace=0,
    )


CASES = {
    "mixtral": (_mixtral, transformers.MixtralForCausalLM, "MixtralSparseMoeBlock"),
    "qwen3_moe": (_qwen3, transformers.Qwen3MoeForCausalLM, "Qwen3MoeSparseMoeBlock"),
    "qwen3_moe_nonorm": (_qwen3_nonorm, transformers.Qwen3MoeForCausalLM, "Qwen3MoeSparseMoeBlock"),
    "qwen2_moe": (_qwen2, transformers.Qwen2MoeForCausalLM, "Qwen2MoeSparseMoeBlock"),
    "olmoe": (_olmoe, transformers.OlmoeForCausalLM, "OlmoeSparseMoeBlock"),
    "granitemoe": (_granite, transformers.GraniteMoeForCausalLM, "GraniteMoeMoE"),
    "deepseek_v2": (_dsv2, transformers.DeepseekV2ForCausalLM, "DeepseekV2Moe"),
    "deepseek_v2_greedy": (
        lambda: _dsv2("greedy"),
        transformers.DeepseekV2ForCausalLM,
        "DeepseekV2Moe",
    ),
    "deepseek_v3": (_dsv3, transformers.DeepseekV3ForCausalLM, "DeepseekV3MoE"),
}


def _randomize(model: nn.Module, seed: int) -> None:
    """Random values in every parameter and in the correction-bias buffers."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(
                    torch.randn(p.shape, generator=g)
                    * (0.5 if p.dim() == 1 else p.shape[-1] ** -0.5)
                )
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def _build(case: str, seed: int = 0):
    make_cfg, cls, block_cls = CASES[case]
    torch.manual_seed(seed)
    model = cls(make_cfg()).float().eval()
    _randomize(model, seed)
    return model, block_cls


def _blocks(model, block_cls):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ == block_cls]


@pytest.mark.parametrize("case", sorted(CASES))
def test_patched_model_logits_match(case):
    model, block_cls = _build(case)
    n_blocks = len(_blocks(model, block_cls))
    assert n_blocks >= 1
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    # Non-MoE modules must be the very same objects after patching.
    block_paths = [n for n, _ in _blocks(model, block_cls)]
    others = {
        n: m
        for n, m in model.named_modules()
        if not any(n == p or n.startswith(p + ".") for p in block_paths)
    }
    patch_model(model)
    summary = model.moeflow_patch_summary
    assert summary.count == n_blocks and summary.by_class() == {block_cls: n_blocks}
    assert not _blocks(model, block_cls)
    assert sum(isinstance(m, MoELayer) for m in model.modules()) == n_blocks
    after_modules = dict(model.named_modules())
    for n, m in others.items():
        assert after_modules[n] is m, n
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert before.abs().max() > 1e-2  # random weights give non-trivial logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v2", "deepseek_v3"])
def test_block_output_and_grads_match(case):
    """Block level, in train mode: same output and same input/router/expert gradients."""
    model, block_cls = _build(case, seed=3)
    _, block = _blocks(model, block_cls)[0]
    block.train()
    layer = from_hf_block(block)
    assert layer.training
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(5))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = block(x1)
    y = layer(x2)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y)
    (y_ref * g).sum().backward()
    (y * g).sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        layer.experts.w_in.grad, block.experts.gate_up_proj.grad, atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(
        layer.experts.w_out.grad, block.experts.down_proj.grad, atol=1e-5, rtol=1e-5
    )
    router = getattr(block, "gate", None)
    torch.testing.assert_close(layer.router.weight.grad, router.weight.grad, atol=1e-5, rtol=1e-5)


def test_copy_is_exact_and_keeps_dtype_device_mode():
    model, block_cls = _build("deepseek_v3")
    _, block = _blocks(model, block_cls)[0]
    block.eval()
    layer = from_hf_block(block)
    assert not layer.training
    assert layer.cfg.router == "deepseek" and layer.cfg.correction_bias
    assert (layer.cfg.n_group, layer.cfg.topk_group, layer.cfg.top_k) == (4, 2, 4)
    assert torch.equal(layer.router.correction_bias, block.gate.e_score_correction_bias)
    assert "router.correction_bias" in layer.state_dict()
    assert torch.equal(layer.experts.w_in, block.experts.gate_up_proj)
    assert torch.equal(layer.shared.w_in[:16], block.shared_experts.gate_proj.weight)
    assert torch.equal(layer.shared.w_in[16:], block.shared_experts.up_proj.weight)
    assert torch.equal(layer.shared.w_out, block.shared_experts.down_proj.weight)
    # A copy, not a view: changing the block does not change the layer.
    with torch.no_grad():
        block.experts.gate_up_proj.add_(1.0)
    assert not torch.equal(layer.experts.w_in, block.experts.gate_up_proj)
    block_bf16 = _blocks(_build("mixtral")[0].to(torch.bfloat16), "MixtralSparseMoeBlock")[0][1]
    layer_bf16 = from_hf_block(block_bf16)
    assert {p.dtype for p in layer_bf16.parameters()} == {torch.bfloat16}
    y = layer_bf16(torch.randn(2, 5, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_qwen2_shared_gate_copied():
    model, block_cls = _build("qwen2_moe")
    _, block = _blocks(model, block_cls)[0]
    layer = from_hf_block(block)
    assert layer.cfg.shared_expert_gate == "sigmoid"
    assert layer.cfg.shared_ffn_size == 40
    assert torch.equal(layer.shared.gate, block.shared_expert_gate.weight)


def test_unsupported_family_raises_naming_class():
    cfg = transformers.PhimoeConfig(
        **COMMON, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
    )
    model = transformers.PhimoeForCausalLM(cfg).eval()
    before = {n: id(m) for n, m in model.named_modules()}
    with pytest.raises(UnsupportedModelError, match="PhimoeSparseMoeBlock"):
        patch_model(model)
    assert {n: id(m) for n, m in model.named_modules()} == before  # nothing replaced
    block = model.model.layers[0].mlp
    assert is_moe_block(block)
    with pytest.raises(UnsupportedModelError, match="PhimoeSparseMoeBlock"):
        from_hf_block(block)


def test_unknown_moe_like_module_raises():
    class MyFancyMoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(4, 2)
            self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])

    model = nn.Sequential(nn.Linear(4, 4), MyFancyMoE())
    with pytest.raises(UnsupportedModelError, match="MyFancyMoE"):
        patch_model(model)


def test_mixtral_router_jitter_matches_transformers():
    """router_jitter_noise > 0: in training mode the same seed gives the same noise, hence the
    same outputs and loss as transformers; eval mode has no noise."""
    cfg = _mixtral()
    cfg.router_jitter_noise = 0.3
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).float().train()
    _randomize(model, 4)
    _, block = _blocks(model, "MixtralSparseMoeBlock")[0]
    layer = from_hf_block(block)
    assert layer.router_jitter_noise == 0.3
    x = torch.randn(3, 7, 32, generator=torch.Generator().manual_seed(5))
    torch.manual_seed(9)
    y_ref = block(x.clone())
    torch.manual_seed(9)
    y = layer(x.clone())
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.manual_seed(10)
    assert not torch.allclose(layer(x.clone()), y, atol=1e-4)  # the noise is there
    block.eval()
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), block(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(layer(x), layer(x))  # no noise in eval
    # whole model, training mode: same loss under the same seed
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    ref = model(input_ids=ids, labels=ids).loss
    patch_model(model)
    assert model.moeflow_patch_summary.count == cfg.num_hidden_layers
    torch.manual_seed(11)
    out = model(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_model_without_moe_is_untouched():
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**COMMON, intermediate_size=48))
    before = {n: m for n, m in model.named_modules()}
    patch_model(model)
    assert model.moeflow_patch_summary.count == 0
    assert dict(model.named_modules()) == before


def test_supported_classes_listed():
    names = supported_classes()
    for want in (
        "MixtralSparseMoeBlock",
        "Qwen3MoeSparseMoeBlock",
        "Qwen2MoeSparseMoeBlock",
        "DeepseekV2Moe",
        "DeepseekV3MoE",
    ):
        assert want in names


# Families whose block/router/experts source equals one of the families above (prefix aside):
# checked at block level, built straight from their config classes. Bailing-hybrid's experts
# and shared experts clip the SwiGLU from transformers 5.25 where their per-layer limits are set;
# with the default limits (off) they compute DeepSeek-V3's function, as in 5.24.
EXTRA_BLOCKS = {
    "minimax": "MiniMaxSparseMoeBlock",
    "mellum": "MellumSparseMoeBlock",
    "qwen3_next": "Qwen3NextSparseMoeBlock",
    "dots1": "Dots1MoE",
    "kimi_linear": "KimiLinearMoE",
    "bailing_hybrid": "BailingHybridMoE",
    "deepseek_ocr2": "DeepseekOcr2TextMoe",
    "unlimited_ocr": "UnlimitedOcrTextMoe",
    "qwen3_vl_moe": "Qwen3VLMoeTextSparseMoeBlock",
}
_EXTRA_KW = dict(
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_experts=8,
    n_routed_experts=8,
    num_local_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    shared_expert_intermediate_size=40,
    num_attention_heads=4,
    num_hidden_layers=2,
    routed_scaling_factor=1.5,
    topk_method="group_limited_greedy",
)


def _extra_block(family, layer_idx=0, **overrides):
    """The family's MoE block (of layer ``layer_idx`` where the block takes a layer index),
    random weights."""
    import importlib
    import inspect

    try:
        mod = importlib.import_module(f"transformers.models.{family}.modeling_{family}")
        cfg = transformers.AutoConfig.for_model(family, **_EXTRA_KW, **overrides)
    except (ImportError, ValueError, KeyError) as exc:
        pytest.skip(f"{family} not available in this transformers: {exc}")
    if hasattr(cfg, "text_config"):
        cfg = cfg.text_config
        for k, v in _EXTRA_KW.items():
            setattr(cfg, k, v)
    cls = getattr(mod, EXTRA_BLOCKS[family])
    kw = {"layer_idx": layer_idx} if "layer_idx" in inspect.signature(cls).parameters else {}
    block = cls(cfg, **kw).float().eval()
    _randomize(block, seed=7)
    return block


@pytest.mark.parametrize("family", sorted(EXTRA_BLOCKS))
def test_source_identical_family_blocks_match(family):
    block = _extra_block(family)
    layer = from_hf_block(block)
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y_ref, y = block(x), layer(x)
    assert y_ref.abs().max() > 1e-3
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("limits", "what"),
    [
        (dict(expert_swiglu_limit_list=[0.5, 0.0]), "experts"),
        (dict(share_expert_swiglu_limit_list=[0.5, 0.0]), "shared experts"),
    ],
)
def test_bailing_hybrid_swiglu_clipping_raises(limits, what):
    """A Bailing-hybrid layer whose SwiGLU clipping is on is refused (moeflow does not clip); a
    layer of the same model with it off converts and matches."""
    block = _extra_block("bailing_hybrid", layer_idx=0, **limits)
    clipped = block.experts if what == "experts" else block.shared_experts
    if getattr(clipped, "limit", None) is None:
        pytest.skip(f"this transformers' Bailing-hybrid {what} do not clip")
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        y_clipped = block(x)
        limit, clipped.limit = clipped.limit, None
        assert not torch.allclose(y_clipped, block(x), atol=1e-4)  # the clipping is active
        clipped.limit = limit
    with pytest.raises(UnsupportedModelError, match=f"BailingHybridMoE.*its {what} clip"):
        from_hf_block(block)
    unclipped = _extra_block("bailing_hybrid", layer_idx=1, **limits)
    layer = from_hf_block(unclipped)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), unclipped(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["qwen3_moe", "deepseek_v3"])
def test_bf16_block_routes_like_transformers(case):
    """bf16: the converted layer picks the same experts (router GEMM in the same dtype as
    transformers), so outputs agree to bf16 rounding, not just on average."""
    model, block_cls = _build(case, seed=11)
    _, block = _blocks(model, block_cls)[0]
    block = block.to(torch.bfloat16)
    layer = from_hf_block(block)
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(12)).bfloat16()
    with torch.no_grad():
        y_ref, y = block(x).float(), layer(x).float()
    assert y.dtype == torch.float32 and y_ref.abs().max() > 1e-2
    torch.testing.assert_close(y, y_ref, atol=4e-2, rtol=4e-2)


@pytest.mark.parametrize("run_before_patch", [True, False])
@pytest.mark.parametrize("case", ["mixtral", "qwen3_moe"])
def test_output_router_logits_and_aux_loss_survive_patching(case, run_before_patch):
    """transformers' load-balancing loss reads router logits through its output recorder; the
    patched layers re-emit them, whether transformers installed its hooks before or after."""
    model, _ = _build(case, seed=2)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids, output_router_logits=True)
    if not run_before_patch:
        model, _ = _build(case, seed=2)
    patch_model(model)
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == len(ref.router_logits) == 2
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-5, rtol=1e-5)


def test_integrations_reexports_the_hf_entry_points(monkeypatch):
    import sys

    import moeflow.integrations as integrations
    from moeflow.integrations import hf

    for name in ("patch_model", "from_hf_block", "supported_classes"):
        assert name in dir(integrations) and name in integrations.__all__
        assert getattr(integrations, name) is getattr(hf, name)
    with pytest.raises(AttributeError, match="nope"):
        integrations.__getattr__("nope")
    # without transformers the first use names the extra to install
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r'pip install "moeflow\[hf\]"'):
        integrations.__getattr__("patch_model")
