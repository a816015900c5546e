import dataclasses

import pytest

from moeflow import MoEConfig, model_preset, preset_names
from moeflow.errors import ConfigError


def test_presets_exist_with_published_shapes():
    names = set(preset_names())
    assert {
        "mixtral-8x7b",
        "mixtral-8x22b",
        "qwen3-30b-a3b",
        "qwen3-235b-a22b",
        "deepseek-v2",
        "deepseek-v3",
        "gpt2-xl-moe",
    } <= names
    m = model_preset("mixtral-8x7b").moe
    assert (m.hidden_size, m.ffn_hidden_size, m.num_experts, m.top_k) == (4096, 14336, 8, 2)
    q = model_preset("qwen3-30b-a3b").moe
    assert (q.hidden_size, q.ffn_hidden_size, q.num_experts, q.top_k) == (2048, 768, 128, 8)
    d = model_preset("deepseek-v3").moe
    assert (d.num_experts, d.top_k, d.n_group, d.topk_group, d.routed_scaling_factor) == (
        256,
        8,
        8,
        4,
        2.5,
    )
    assert d.score_func == "sigmoid" and d.correction_bias and d.num_shared_experts == 1
    assert MoEConfig.preset("deepseek-v2").score_func == "softmax"


@pytest.mark.parametrize(
    "field,value",
    [
        ("hidden_size", 0),
        ("num_experts", -1),
        ("top_k", 9),
        ("router", "nope"),
        ("expert_type", "relu"),
        ("capacity_factor", 0.0),
        ("n_group", 3),
        ("kernel", "cuda"),
        ("score_func", "tanh"),
        ("shared_expert_gate", "relu"),
        ("aux_loss_coef", -1.0),
    ],
)
def test_bad_fields_name_themselves(field, value):
    kw = dict(hidden_size=8, ffn_hidden_size=8, num_experts=8, top_k=2)
    kw[field] = value
    with pytest.raises(ConfigError) as info:
        MoEConfig(**kw)
    assert info.value.field == field
    assert field in str(info.value)
    assert isinstance(info.value, ValueError)


def test_frozen_and_round_trip():
    c = MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.top_k = 3
    assert MoEConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ConfigError):
        MoEConfig.from_dict({**c.to_dict(), "bogus": 1})
    with pytest.raises(ConfigError):
        model_preset("gpt-5")


def test_integer_fields_share_one_validator():
    # numpy integers are integers (stored back as int); bools and floats are not
    np = pytest.importorskip("numpy")
    c = MoEConfig(hidden_size=np.int64(8), ffn_hidden_size=8, num_experts=np.int32(4))
    assert type(c.hidden_size) is int and type(c.num_experts) is int
    assert MoEConfig.from_dict(c.to_dict()) == c
    for field, value in [("top_k", True), ("ffn_hidden_size", 8.0), ("xmoe_dim", 0)]:
        with pytest.raises(ConfigError, match=f"{field}=.* a positive int"):
            MoEConfig(**{"hidden_size": 8, "ffn_hidden_size": 8, "num_experts": 4, field: value})
    with pytest.raises(ConfigError, match=r"an int in \[1, n_group=2\]") as info:
        MoEConfig(hidden_size=8, ffn_hidden_size=8, num_experts=4, n_group=2, topk_group=3)
    assert info.value.field == "topk_group"


def test_shared_validators(tmp_path):
    from moeflow.errors import InputError
    from moeflow.validate import output_file, positive_int

    assert positive_int("n", 3, maximum=4, maximum_name="cap") == 3
    with pytest.raises(ConfigError, match=r"n=5 is not allowed: an int in \[1, cap=4\]"):
        positive_int("n", 5, maximum=4, maximum_name="cap")
    with pytest.raises(ConfigError, match=r"an int in \[1, 4\]"):
        positive_int("n", 0, maximum=4)
    output_file("--out", None)
    output_file("--out", tmp_path / "plan.json")  # a new file in an existing dir
    with pytest.raises(InputError, match="--out .* is a directory"):
        output_file("--out", tmp_path)
    with pytest.raises(InputError, match="--png .* does not exist"):
        output_file("--png", tmp_path / "missing" / "x.png")
