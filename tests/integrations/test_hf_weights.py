"""A patched transformers model used as transformers users use it: save_pretrained /
from_pretrained, load_state_dict, init_weights, torch.export / torch.compile, parallelism plans.

Tiny random models (fp32) built in the test; checkpoints go to pytest's tmp_path.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from test_hf import CASES, VOCAB, _build  # noqa: E402

from moeflow import MoELayer  # noqa: E402
from moeflow.checkpoint.hf_keys import ADAPTERS  # noqa: E402
from moeflow.errors import InputError, RoutingError  # noqa: E402
from moeflow.integrations.hf import (  # noqa: E402
    moeflow_state_dict_keys,
    patch_model,
    state_dict_adapter,
)

FAST = ["mixtral", "qwen2_moe", "deepseek_v3"]
SLOW = sorted(set(CASES) - set(FAST))
ALL = FAST + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW]


def _ids(seed=1, shape=(2, 9)):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _files(d):
    return safetensors_torch.load_file(str(d / "model.safetensors"))


@pytest.mark.parametrize("case", ALL)
def test_save_pretrained_writes_transformers_checkpoint(case, tmp_path):
    """save_pretrained of a patched model writes what the unpatched model writes; the directory
    reloads, patched or not, with no missing/unexpected keys and the same logits."""
    model, _ = _build(case, seed=21)
    cls = type(model)
    ids = _ids()
    ref_sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "plain")
    patch_model(model)
    assert any(isinstance(m, MoELayer) for m in model.modules())
    logits = _logits(model, ids)

    sd = model.state_dict()
    assert list(sd) == list(ref_sd) or set(sd) == set(ref_sd)
    for k, v in ref_sd.items():
        assert torch.equal(sd[k], v), k
    model.save_pretrained(tmp_path / "patched")
    plain, patched = _files(tmp_path / "plain"), _files(tmp_path / "patched")
    assert set(patched) == set(plain)
    for k in plain:
        assert torch.equal(patched[k], plain[k]), k

    for repatch in (False, True):
        loaded, info = cls.from_pretrained(tmp_path / "patched", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        assert not info["mismatched_keys"] and not info["error_msgs"], info
        loaded.eval()
        if repatch:
            patch_model(loaded)
        torch.testing.assert_close(_logits(loaded, ids), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ALL)
def test_patched_model_loads_transformers_state_dict(case):
    """load_state_dict takes transformers' keys (strict) and the result computes what the
    model those weights came from computes; moeflow's parameter names stay for optimizers."""
    model, _ = _build(case, seed=1)
    other, _ = _build(case, seed=2)
    ids = _ids()
    want = _logits(other, ids)
    patch_model(model)
    assert not torch.allclose(_logits(model, ids), want)
    result = model.load_state_dict(other.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    torch.testing.assert_close(_logits(model, ids), want, atol=1e-5, rtol=1e-5)
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith(".experts.w_in") for n in names)
    assert not any("hf_view" in n for n in names)  # the view owns nothing
    with moeflow_state_dict_keys(model):
        ours = model.state_dict()
    assert set(names) <= set(ours) and not any(".gate_up_proj" in k for k in ours)
    assert set(model.state_dict()) == set(other.state_dict())  # transformers' names again
    fresh, _ = _build(case, seed=3)
    patch_model(fresh)
    fresh.load_state_dict(ours, strict=True)  # moeflow's names load too
    torch.testing.assert_close(_logits(fresh, ids), want, atol=1e-5, rtol=1e-5)


def test_adapter_round_trip_and_partial_input():
    adapter = ADAPTERS["qwen2_moe"]
    sd = {
        "x.router.weight": torch.randn(4, 6),
        "x.experts.w_in": torch.randn(4, 10, 6),
        "x.experts.w_out": torch.randn(4, 6, 5),
        "x.shared.w_in": torch.randn(8, 6),
        "x.shared.w_out": torch.randn(6, 4),
        "x.shared.gate": torch.randn(1, 6),
        "other.weight": torch.randn(3),
    }
    hf = adapter.to_hf(sd, prefix="x.")
    assert set(hf) == {"x." + k for k in adapter.hf_keys()} | {"other.weight"}
    assert torch.equal(hf["x.shared_expert.gate_proj.weight"], sd["x.shared.w_in"][:4])
    assert torch.equal(hf["x.shared_expert.up_proj.weight"], sd["x.shared.w_in"][4:])
    back = adapter.from_hf(hf, prefix="x.")
    assert set(back) == set(sd)
    for k in sd:
        assert torch.equal(back[k], sd[k]), k
    del hf["x.shared_expert.up_proj.weight"]
    with pytest.raises(InputError, match="shared_expert.up_proj.weight"):
        adapter.from_hf(hf, prefix="x.")
    assert state_dict_adapter("DeepseekV3MoE") is ADAPTERS["deepseek_v3"]


def _clear_init_flags(model):
    for m in model.modules():
        m.__dict__.pop("_is_hf_initialized", None)
    for t in list(model.parameters()) + list(model.buffers()):
        t.__dict__.pop("_is_hf_initialized", None)


@pytest.mark.parametrize("case", ALL)
def test_init_weights_after_patch_matches_transformers(case):
    """init_weights() works on a patched model, skips what transformers skips, and initialises
    the moeflow tensors exactly as transformers initialises the replaced block's."""
    model, _ = _build(case, seed=5)
    patched = copy.deepcopy(model)
    patch_model(patched)
    ref = model.state_dict()
    patched.init_weights()  # everything is flagged initialised: nothing changes
    for k, v in patched.state_dict().items():
        assert torch.equal(v, ref[k]), k
    patched.resize_token_embeddings(VOCAB + 3)
    model.resize_token_embeddings(VOCAB + 3)

    _clear_init_flags(model)
    _clear_init_flags(patched)
    torch.manual_seed(123)
    model.init_weights()
    torch.manual_seed(123)
    patched.init_weights()
    ref = model.state_dict()
    changed = 0
    for k, v in patched.state_dict().items():
        assert torch.equal(v, ref[k]), k
        changed += "experts.gate_up_proj" in k
    assert changed > 0
    ids = _ids()
    torch.testing.assert_close(
        _logits(patched.eval(), ids), _logits(model.eval(), ids), atol=1e-5, rtol=1e-5
    )


def test_patched_model_deepcopies_and_pickles():
    """The transformers view follows the layer through deepcopy and pickling: the copy's
    init_weights and router logits use the copy's tensors."""
    model, _ = _build("qwen3_moe", seed=2)
    patch_model(model)
    # pickled before the first forward: transformers' own output-capturing hooks (installed on
    # the first forward) are local functions that pickle refuses, patched or not
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    ids = _ids()
    ref = model(input_ids=ids, output_router_logits=True)
    clones = [copy.deepcopy(model), torch.load(buf, weights_only=False)]
    for clone in clones:
        layer = clone.model.layers[0].mlp
        assert layer.hf_view.gate.weight is layer.router.weight
        out = clone(input_ids=ids, output_router_logits=True)
        torch.testing.assert_close(out.logits, ref.logits)
        assert len(out.router_logits) == len(ref.router_logits)
        with torch.no_grad():
            layer.router.weight.zero_()
        assert model.model.layers[0].mlp.router.weight.abs().sum() > 0


def _resolves(owner, key):
    rx = re.compile(r"[^.]+".join(re.escape(p) for p in key.split("*")))
    paths = [n for n, _ in owner.named_modules()] + [n for n, _ in owner.named_parameters()]
    return [p for p in paths if rx.fullmatch(p)]


def _plans(model):
    """(owner path, plan name, plan) for every transformers model inside ``model``."""
    out = []
    for path, owner in model.named_modules():
        if isinstance(owner, transformers.PreTrainedModel):
            for attr in ("_tp_plan", "_ep_plan", "_pp_plan"):
                out.append((path, attr, dict(getattr(owner, attr, None) or {})))
            if owner is owner.base_model:
                out.append(
                    (path, "config.base_model_tp_plan", dict(owner.config.base_model_tp_plan or {}))
                )
    return out


@pytest.mark.parametrize("case", ["mixtral", "qwen2_moe", "deepseek_v2"])
def test_parallel_plans_name_only_existing_modules(case):
    """After patching, every plan entry that named something still names an existing module
    or parameter outside the moeflow layers, or is gone (entries transformers lists for other
    configurations, naming nothing in this model, are left as they are). Exactly the entries
    that named something inside a replaced block are gone: the TP plan's where transformers
    lists the experts there (5.24; 5.25 lists them in the EP plan only), always the EP plan's."""
    model, block_cls = _build(case)
    block_paths = [n for n, m in model.named_modules() if type(m).__name__ == block_cls]
    assert block_paths

    def in_block(full):
        return any(f == p or f.startswith(p + ".") for f in full for p in block_paths)

    before = {}
    for p, a, plan in _plans(model):
        owner = model.get_submodule(p)
        before[(p, a)] = {k: [f"{p}.{h}" if p else h for h in _resolves(owner, k)] for k in plan}
    n_tp, n_ep = len(model._tp_plan), len(model._ep_plan)
    tp_block = {k for k, full in before[("", "_tp_plan")].items() if in_block(full)}
    if case == "deepseek_v2":  # its shared experts are in the TP plan in every 5.x
        assert tp_block
    patch_model(model)
    moe_paths = [n for n, m in model.named_modules() if isinstance(m, MoELayer)]
    assert sorted(moe_paths) == sorted(block_paths)
    checked = 0
    for path, attr, plan in _plans(model):
        owner = model.get_submodule(path)
        for key in plan:
            hits = _resolves(owner, key)
            assert hits or not before[(path, attr)][key], (path, attr, key)
            full = [f"{path}.{h}" if path else h for h in hits]
            assert not any(f == p or f.startswith(p + ".") for f in full for p in moe_paths), key
            checked += bool(hits)
        removed = set(before[(path, attr)]) - set(plan)
        named_block = {k for k, full in before[(path, attr)].items() if in_block(full)}
        assert removed == named_block, (path, attr)  # only, and all of, what the blocks held
    assert checked > 0
    assert len(model._ep_plan) < n_ep
    assert len(model._tp_plan) == n_tp - len(tp_block)
    assert tp_block.isdisjoint(model._tp_plan)
    assert "lm_head" in model._tp_plan  # the dense entries stay
    # device_map and fp32 pins: classes and state-dict keys that still exist
    classes = {type(m).__name__ for m in model.modules()}
    assert set(model._no_split_modules) <= classes
    keys = list(model.state_dict())
    for pin in model._keep_in_fp32_modules_strict or ():
        assert any(pin in k for k in keys), pin


def _tiny_qwen3():
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return transformers.Qwen3MoeForCausalLM(cfg).float().eval()


def test_torch_export_patched_model():
    model = _tiny_qwen3()
    ids = _ids(shape=(2, 7))
    ref = _logits(model, ids)
    patch_model(model)
    ep = torch.export.export(model, (), {"input_ids": ids, "use_cache": False})
    with torch.no_grad():
        out = ep.module()(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    layer = model.model.layers[0].mlp
    with pytest.raises(RoutingError, match="not finite"):  # eager keeps the typed error
        layer(torch.full((1, 3, 32), float("nan")))


def test_torch_compile_fullgraph_patched_model():
    model = _tiny_qwen3()
    ids = _ids(shape=(2, 7))
    ref = model(input_ids=ids, labels=ids, output_router_logits=True)
    patch_model(model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(input_ids=ids, labels=ids, output_router_logits=True)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, atol=1e-6, rtol=1e-6)
    out.loss.backward()  # the traced experts path trains
    assert model.model.layers[0].mlp.experts.w_in.grad.abs().sum() > 0
    # the finite check is traced as an assert: a RuntimeError at run time, not a graph break
    # (a layer of its own, outside any transformers model and its output-capture hooks)
    cfg = model.model.layers[0].mlp.cfg
    layer = torch.compile(MoELayer(cfg), fullgraph=True, backend="aot_eager")
    with pytest.raises(RuntimeError, match="not finite"):
        layer(torch.full((1, 3, 32), float("nan")))
