"""A tiny Qwen3-MoE checkpoint with a character-level tokenizer and a ChatML template, and a
real uvicorn server over it on a free local port."""

import pytest

from tests.serving.serving_live import LiveServer

SPECIALS = ["<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 \n.,!?:;'-()[]{}/\"@#$%&*"
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_checkpoint(path):
    """Save a tiny Qwen3-MoE model and its tokenizer into ``path``; returns the HF model."""
    import torch
    import transformers
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    assert len(vocab) == 64
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        eos_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=96,
        moe_intermediate_size=24,
        num_experts=6,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        initializer_range=0.2,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).eval()
    model.save_pretrained(str(path))
    return model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """(transformers model, checkpoint directory)."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    path = tmp_path_factory.mktemp("serve_ckpt")
    return make_checkpoint(path), path


@pytest.fixture
def live_server():
    """The :class:`LiveServer` class (a context manager over an app)."""
    return LiveServer


@pytest.fixture(scope="module")
def served(checkpoint):
    """(OpenAIServer, base URL) of the checkpoint behind a live uvicorn."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from moeflow.serving.engine import EngineConfig
    from moeflow.serving.openai_api import build_app, from_pretrained

    server = from_pretrained(
        checkpoint[1], EngineConfig(block_size=4, max_seqs=8, max_prefill_tokens=16), "tiny"
    )
    with LiveServer(build_app(server)) as live:
        yield server, live.url


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny model's ops stall when OpenMP threads contend."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
