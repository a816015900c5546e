"""Tiny transformers checkpoints (Qwen3-MoE, Mixtral) saved with ``save_pretrained``."""

import pytest


def _tiny(kind: str, path, **over):
    import torch
    import transformers

    common = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=40,
        initializer_range=0.2,
    )
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(
            moe_intermediate_size=24,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
            head_dim=8,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            **{**common, **over},
        )
        cls = transformers.Qwen3MoeForCausalLM
    elif kind == "deepseek_v2":
        cfg = transformers.DeepseekV2Config(
            moe_intermediate_size=16,
            n_routed_experts=8,
            num_experts_per_tok=2,
            n_shared_experts=2,
            q_lora_rank=12,
            kv_lora_rank=8,
            qk_nope_head_dim=8,
            qk_rope_head_dim=4,
            v_head_dim=6,
            first_k_dense_replace=0,
            topk_method="group_limited_greedy",
            n_group=4,
            topk_group=2,
            routed_scaling_factor=2.0,
            **{**common, "num_key_value_heads": 4, **over},
        )
        cls = transformers.DeepseekV2ForCausalLM
    else:
        cfg = transformers.MixtralConfig(
            num_local_experts=4, num_experts_per_tok=2, **{**common, **over}
        )
        cls = transformers.MixtralForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session", params=["qwen3_moe", "mixtral", "deepseek_v2"])
def tiny_checkpoint(request, tmp_path_factory):
    """(transformers model, checkpoint directory) for each family."""
    path = tmp_path_factory.mktemp(request.param)
    return _tiny(request.param, path), path


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: tiny ops (index_add on a few rows) stall for tens of ms when
    OpenMP threads contend on a busy 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
