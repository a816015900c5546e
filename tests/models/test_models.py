"""moeflow.models against transformers: logits, cached greedy decoding, sampling, export, and
requests that fail alone."""

import json

import pytest
import torch

from moeflow.checkpoint import load_pretrained, to_hf_state_dict
from moeflow.errors import ConfigError, CorruptDataError, InputError, UnsupportedModelError
from moeflow.models import Request, SamplingParams, generate


def prompts(n_max=9):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(1, 96, (n,), generator=g).tolist() for n in (n_max, 3, 6, 1)]


def test_logits_equal_transformers_per_sequence_in_a_padded_batch(tiny_checkpoint):
    hf, path = tiny_checkpoint
    model = load_pretrained(path)
    ps = prompts()
    width = max(map(len, ps))
    ids = torch.tensor([p + [0] * (width - len(p)) for p in ps])
    with torch.no_grad():
        ours = model(ids)
        for b, p in enumerate(ps):
            ref = hf(torch.tensor([p])).logits[0]
            assert ref.abs().max() > 0.1  # the check below means something
            torch.testing.assert_close(ours[b, : len(p)], ref, rtol=0, atol=1e-5)


def test_cached_greedy_equals_transformers_generate(tiny_checkpoint):
    hf, path = tiny_checkpoint
    model = load_pretrained(path)
    ps = prompts()
    res = generate(
        model, [Request(p, SamplingParams(max_new_tokens=7)) for p in ps], return_logits=True
    )
    for p, r in zip(ps, res):
        assert r.ok and r.finish_reason == "length" and len(r.tokens) == 7
        out = hf.generate(
            torch.tensor([p]), max_new_tokens=7, do_sample=False, pad_token_id=0, eos_token_id=None
        )
        assert r.tokens == out[0, len(p) :].tolist()
        # logits of the last step from the cache equal a full forward over the sequence
        full = hf(torch.tensor([p + r.tokens[:-1]])).logits[0, -1]
        torch.testing.assert_close(r.logits[-1], full, rtol=0, atol=1e-5)


def test_sampling_is_seeded_per_request(tiny_checkpoint):
    _, path = tiny_checkpoint
    model = load_pretrained(path)
    ps = prompts()
    sp = SamplingParams(max_new_tokens=6, temperature=1.5, top_p=0.95, seed=11)
    alone = generate(model, [Request(ps[0], sp)])[0].tokens
    batched = generate(model, [Request(ps[1], SamplingParams(4)), Request(ps[0], sp)])[1]
    assert batched.tokens == alone
    other = [
        generate(model, [Request(ps[0], SamplingParams(6, 1.5, 0.95, seed=s))])[0].tokens
        for s in range(4)
    ]
    assert len({tuple(t) for t in other}) > 1  # the seed matters
    # a nucleus smaller than the top token's probability is greedy
    greedy = generate(model, [Request(ps[0], SamplingParams(6))])[0].tokens
    tiny_p = generate(model, [Request(ps[0], SamplingParams(6, 1.0, 1e-9, seed=5))])[0].tokens
    assert tiny_p == greedy


def test_bad_requests_fail_alone(tiny_checkpoint):
    _, path = tiny_checkpoint
    model = load_pretrained(path)
    ps = prompts()
    good = SamplingParams(max_new_tokens=5)
    reqs = [
        Request(ps[0], good, "a"),
        Request([], good, "empty"),
        Request(list(range(1, 42)), good, "too long"),  # context is 40
        Request(ps[1], SamplingParams(5, temperature=-1.0), "temp"),
        Request(ps[1], SamplingParams(5, top_p=0.0), "top_p"),
        Request(ps[1], SamplingParams(0), "max_new"),
        Request([5, 96], good, "vocab"),
        Request(ps[2], good, "c"),
    ]
    res = generate(model, reqs)
    expect = {
        "empty": (InputError, "empty"),
        "too long": (InputError, "context"),
        "temp": (ConfigError, "temperature"),
        "top_p": (ConfigError, "top_p"),
        "max_new": (ConfigError, "max_new_tokens"),
        "vocab": (InputError, "vocab"),
    }
    for r in res:
        if r.request_id in expect:
            cls, word = expect[r.request_id]
            assert isinstance(r.error, cls) and word in str(r.error), r
            assert r.tokens == [] and r.finish_reason == "error"
    alone = generate(model, [Request(ps[0], good), Request(ps[2], good)])
    assert [res[0].tokens, res[7].tokens] == [alone[0].tokens, alone[1].tokens]


def test_generation_stops_at_the_context(tiny_checkpoint):
    _, path = tiny_checkpoint
    model = load_pretrained(path)
    r = generate(model, [Request(list(range(1, 38)), SamplingParams(10))])[0]
    # 37 prompt tokens + generated ones fill positions up to 40
    assert r.finish_reason == "context" and len(r.tokens) == 4


def test_export_round_trips_through_transformers(tiny_checkpoint, tmp_path):
    import transformers
    from safetensors.torch import save_file

    hf, path = tiny_checkpoint
    model = load_pretrained(path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    save_file(
        {k: v.contiguous() for k, v in to_hf_state_dict(model, model.cfg.family).items()},
        str(tmp_path / "model.safetensors"),
    )
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.tensor([prompts()[0]])
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids), rtol=0, atol=1e-5)
    again = load_pretrained(tmp_path)
    for (k, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_loader_errors(tiny_checkpoint, tmp_path):
    _, path = tiny_checkpoint
    with pytest.raises(InputError, match="config.json"):
        load_pretrained(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "llama"}))
    with pytest.raises(UnsupportedModelError, match="llama"):
        load_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    sd.pop("model.norm.weight")
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CorruptDataError, match="model.norm.weight"):
        load_pretrained(tmp_path)


def test_deepseek_v2_dense_layers_are_refused():
    from moeflow.checkpoint import config_from_hf

    hf = {
        "model_type": "deepseek_v2",
        "hidden_size": 32,
        "num_attention_heads": 4,
        "first_k_dense_replace": 1,
    }
    with pytest.raises(UnsupportedModelError, match="first_k_dense_replace"):
        config_from_hf(hf)


def _bad_dirs(src, root):
    """Damaged copies of checkpoint directory ``src``: name -> (dir, error class, needle)."""
    import shutil
    import struct

    from safetensors.torch import load_file, save_file

    raw = (src / "model.safetensors").read_bytes()
    cfg = json.loads((src / "config.json").read_text())
    out = {}

    def copy(name, error, needle, **files):
        d = root / name
        shutil.copytree(src, d)
        for fname, data in files.items():
            fname = fname.replace("_", ".", 1)  # model_safetensors -> model.safetensors
            (d / fname).write_bytes(data) if isinstance(data, bytes) else (d / fname).write_text(
                data
            )
        out[name] = (d, error, needle)
        return d

    copy("truncated", CorruptDataError, "model.safetensors", model_safetensors=raw[: len(raw) // 2])
    copy("garbage", CorruptDataError, "model.safetensors", model_safetensors=b"\x07" * 64)
    copy(
        "huge_header",
        CorruptDataError,
        "claims 1000000000000000 bytes",
        model_safetensors=struct.pack("<Q", 10**15) + raw[8:],
    )
    copy("config_truncated", CorruptDataError, "config.json", config_json=json.dumps(cfg)[:40])
    copy("config_list", CorruptDataError, "config.json", config_json="[1, 2]")
    copy(
        "config_no_field",
        CorruptDataError,
        "config.json: no field 'vocab_size'",
        config_json=json.dumps({k: v for k, v in cfg.items() if k != "vocab_size"}),
    )
    copy(
        "shapes",
        CorruptDataError,
        "embed_tokens.weight is",
        config_json=json.dumps({**cfg, "vocab_size": cfg["vocab_size"] + 5}),
    )
    d = copy("missing_shard", InputError, "missing")
    sd = load_file(str(d / "model.safetensors"))
    (d / "model.safetensors").unlink()
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(d / "model-00001-of-00002.safetensors"))
    index = {k: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return out


def test_damaged_checkpoint_directories_are_typed_errors(tiny_checkpoint, tmp_path):
    """Truncated or garbage weights, a header claiming 10^15 bytes, a damaged or incomplete
    config, a config whose shapes disagree with the weights, an index naming a missing shard:
    each a typed one-line error naming the file."""
    _, path = tiny_checkpoint
    for name, (d, error, needle) in _bad_dirs(path, tmp_path).items():
        with pytest.raises(error, match=needle.replace(".", r"\.")) as ei:
            load_pretrained(d)
        assert "\n" not in str(ei.value), name
