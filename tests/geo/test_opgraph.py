"""The fx operator graph: equal to the model it traces, measured FLOPs and bytes, and stages
that, run in sequence with only the cut tensors passed between them, give exactly the unsplit
loss and gradients (fp32)."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moeflow.errors import ConfigError, InputError, PlanError
from moeflow.geo import opgraph
from moeflow.geo.opgraph import OUTPUT, Stage
from moeflow.models.demo import DemoModelConfig, build_demo_model

B, L, DIM = 2, 16, 32


def _inputs(vocab: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, vocab, (B, L), generator=g),
        torch.randint(0, vocab, (B, L), generator=g),
    )


class Case:
    def __init__(self, name, module, inputs, reference):
        self.name, self.module, self.inputs = name, module, inputs
        self.reference = reference  # the loss computed by the original model, not our module
        self.traced = opgraph.trace(module, inputs)


def _demo_case() -> Case:
    cfg = DemoModelConfig(
        dim=DIM, num_layers=2, num_heads=4, seq_len=L, num_experts=4, top_k=2, ffn_hidden_size=64
    )
    model = build_demo_model(cfg, seed=0)
    module = opgraph.demo_training_module(model)
    inputs = _inputs(256)
    _, lm_loss, aux = model(*inputs)
    case = Case("demo", module, inputs, (lm_loss + aux).detach())
    case.model = model
    return case


def _gpt2_case() -> Case:
    from transformers import GPT2Config

    cfg = GPT2Config(
        vocab_size=64,
        n_positions=L,
        n_embd=DIM,
        n_layer=2,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    module = opgraph.gpt2_training_module(cfg)
    inputs = _inputs(64, seed=1)
    logits = module.lm(inputs[0]).logits  # transformers' own forward
    ref = F.cross_entropy(logits.reshape(-1, 64), inputs[1].reshape(-1)).detach()
    return Case("gpt2", module, inputs, ref)


@pytest.fixture(scope="module", params=["demo", "gpt2"])
def case(request) -> Case:
    return _demo_case() if request.param == "demo" else _gpt2_case()


@pytest.fixture(scope="module")
def demo() -> Case:
    return _demo_case()


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def _reference(case: Case):
    case.module.zero_grad(set_to_none=True)
    loss = case.module(*case.inputs)
    loss.backward()
    grads = _grads(case.module)
    case.module.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _run_pipeline(case: Case, stages: list[Stage]):
    """Forward stage by stage with each cut tensor detached (as if sent), then backward stage
    by stage, feeding each stage the gradients of what it sent. Returns the loss and the bytes
    each stage sent."""
    carry = dict(zip(case.traced.input_names, case.inputs))
    records, sent = [], []
    for st in stages:
        given = {}
        for name in st.input_names:
            t = carry[name].detach()
            given[name] = t.requires_grad_(True) if t.is_floating_point() else t
        out = st(given)
        assert list(out) == st.output_names
        records.append((given, out))
        sent.append(sum(t.numel() * t.element_size() for t in out.values()))
        carry = out
    loss = carry[OUTPUT]
    loss.backward()
    for s in range(len(stages) - 2, -1, -1):
        nxt, out = records[s + 1][0], records[s][1]
        pairs = [(out[n], nxt[n].grad) for n in out if nxt[n].grad is not None]
        pairs = [(t, g) for t, g in pairs if t.requires_grad]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
    return loss.detach(), sent


def _random_bounds(traced, rng: random.Random, stages: int) -> list[int]:
    n = len(traced.ops)
    # interior bounds at or after the model inputs (stage 0 holds them)
    return [0, *sorted(rng.sample(range(len(traced.input_names), n), stages - 1)), n]


# ---- the traced graph ------------------------------------------------------------------------
def test_traced_graph_equals_the_model(case):
    loss = case.traced.gm(*case.inputs)
    assert torch.equal(loss, case.module(*case.inputs))
    # and the module equals the original model's own loss (DemoLM's lm_loss + aux;
    # transformers' GPT2LMHeadModel logits through the same cross entropy)
    assert torch.equal(loss.detach(), case.reference)
    # specialised: no shape query is left in the graph
    for node in case.traced.gm.graph.nodes:
        assert node.target not in ("size", getattr), node.format_node()


def test_training_modules_keep_the_original_parameter_names(case):
    original = case.model.state_dict() if case.name == "demo" else case.module.lm.state_dict()
    ours = case.module.state_dict()
    assert sorted(ours) == sorted(original)
    assert all(ours[k].data_ptr() == original[k].data_ptr() for k in ours)


def test_flops_total_equals_the_counter_on_the_eager_module(case):
    with opgraph.flop_counter() as counter:
        case.module(*case.inputs)
    assert case.traced.ops.flops == counter.get_total_flops() > 0


def test_fake_measurement_equals_a_real_forward(case, monkeypatch):
    """GPT-2 is measured on fake tensors (no arithmetic) and gives the graph a real forward
    pass gives; the demo model's MoE routing depends on data, so it is measured for real."""
    import torch._subclasses.fake_tensor as ft

    faked = []
    run = opgraph._Measure.run

    def spy(self, *args):
        out = run(self, *args)
        faked.append(self.fake is not None)
        return out

    monkeypatch.setattr(opgraph._Measure, "run", spy)
    auto = opgraph.trace(case.module, case.inputs)
    assert faked == [case.name == "gpt2"]

    def no_fake(*a, **k):
        raise RuntimeError("no fake tensors")

    monkeypatch.setattr(ft, "FakeTensorMode", no_fake)
    real = opgraph.trace(case.module, case.inputs)
    assert faked[-1] is False
    assert auto.ops == real.ops and auto.node_names == real.node_names


def test_node_flops_match_the_analytic_counts(demo):
    ops, names = demo.traced.ops, demo.traced.node_names
    flops = dict(zip(names, (n.flops for n in ops.nodes)))
    T, D, E, F_, H, K = B * L, DIM, 4, 64, 4, 2
    N = T * K  # no capacity limit: every token reaches its top-2 experts
    moe = 2 * T * D * E + 2 * N * D * (2 * F_) + 2 * N * F_ * D  # router, w_in (gated), w_out
    attn = 4 * B * H * L * L * (D // H)  # QK^T and AV
    assert flops["blocks_0_moe"] == flops["blocks_1_moe"] == moe
    assert flops["scaled_dot_product_attention"] == attn
    assert flops["blocks_0_qkv"] == 2 * T * D * 3 * D
    assert flops["head"] == 2 * T * D * 256


def test_bytes_and_parameters_of_nodes(demo):
    ops, names = demo.traced.ops, demo.traced.node_names
    node = dict(zip(names, ops.nodes))
    # a leaf returning (y, aux) is one node whose bytes are both elements
    assert node["blocks_0_moe"].out_bytes == B * L * DIM * 4 + 4
    assert node["idx_bl"].out_bytes == B * L * 8 and node["idx_bl"].inputs == ()
    assert names[-1] == OUTPUT and node[OUTPUT].out_bytes == 0
    # views hold no memory of their own
    assert node["view"].act_bytes == 0 and node["blocks_0_qkv"].act_bytes is None
    # every parameter counted once, at its first user
    params = list(demo.module.parameters())
    assert ops.param_bytes == sum(p.numel() * p.element_size() for p in params)
    assert node["blocks_0_moe"].param_bytes == sum(
        p.numel() * 4 for p in demo.model.blocks[0].moe.parameters()
    )
    assert node["getitem_1"].param_bytes == L * DIM * 4  # pos[:L]: the get_attr is folded


def test_trace_keeps_the_global_rng_state(demo):
    state = torch.get_rng_state()
    opgraph.trace(demo.module, demo.inputs)
    assert torch.equal(state, torch.get_rng_state())


# ---- the stages --------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_stages_in_sequence_give_the_unsplit_loss_and_gradients(case, seed):
    ref_loss, ref_grads = _reference(case)
    rng = random.Random(f"{case.name}-{seed}")
    for _ in range(3):
        traced = case.traced
        bounds = _random_bounds(traced, rng, rng.randint(2, 5))
        stages = traced.split(bounds)
        case.module.zero_grad(set_to_none=True)
        loss, sent = _run_pipeline(case, stages)
        assert torch.equal(loss, ref_loss), bounds
        grads = _grads(case.module)
        assert grads.keys() == ref_grads.keys()
        for name, g in ref_grads.items():
            assert torch.equal(grads[name], g), (bounds, name)
        # what each stage sends is exactly the planner's cut
        for s, st in enumerate(stages[:-1]):
            assert sent[s] == traced.ops.cut_bytes(bounds[s + 1]), (bounds, s)
            assert st.output_names == traced.cut_names(bounds[s + 1])
        assert stages[-1].output_names == [OUTPUT]


def test_every_cut_sends_exactly_cut_bytes(demo):
    traced = demo.traced
    n = len(traced.ops)
    for b in range(len(traced.input_names), n):
        first, second = traced.split([0, b, n])
        with torch.no_grad():
            out = first(dict(zip(traced.input_names, demo.inputs)))
            loss = second(out)[OUTPUT]
        assert sum(t.numel() * t.element_size() for t in out.values()) == traced.ops.cut_bytes(b)
        assert torch.equal(loss, demo.reference)


@pytest.mark.parametrize("seed", range(3))
def test_stage_parameters_partition_the_model_parameters(case, seed):
    rng = random.Random(seed)
    stages = case.traced.split(_random_bounds(case.traced, rng, rng.randint(2, 6)))
    model_params = {id(p): n for n, p in case.module.named_parameters()}
    seen: dict[int, int] = {}
    for st in stages:
        for name, p in st.named_parameters():
            assert id(p) not in seen  # no parameter in two stages
            seen[id(p)] = st.index
            assert model_params[id(p)] == name  # same object, same name
        sd = st.state_dict()
        full = case.module.state_dict()
        assert all(sd[k].data_ptr() == full[k].data_ptr() for k in sd)
    assert set(seen) == set(model_params)


def test_stage_checkpoint_loads_into_the_original_model(demo):
    stages = demo.traced.split([0, 20, len(demo.traced.ops)])
    fresh = build_demo_model(demo.model.cfg, seed=1)
    merged = {}
    for st in stages:
        merged.update(st.state_dict())
    result = fresh.load_state_dict(merged, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in merged.items())


# ---- bad input ---------------------------------------------------------------------------
def test_bad_bounds(demo):
    n = len(demo.traced.ops)
    for bad in ([1, n], [0, 5, 5, n], [0, 10, n - 1], [0, 2.0, n], "0,n", [0, n + 1], [0]):
        with pytest.raises(ConfigError, match="bounds"):
            demo.traced.split(bad)
    with pytest.raises(PlanError, match="model inputs"):
        demo.traced.split([0, 1, n])
    assert len(demo.traced.split([0, n])) == 1


def test_stage_names_missing_inputs(demo):
    first, second = demo.traced.split([0, 20, len(demo.traced.ops)])
    with pytest.raises(InputError, match="stage 1 is missing inputs"):
        second({"targets_bl": demo.inputs[1]})
    with pytest.raises(InputError, match="dict"):
        first(list(demo.inputs))


class _ItemUser(nn.Module):
    def forward(self, x):
        return x * x.sum().item()


class _TupleUser(nn.Module):
    class Pair(nn.Module):
        def forward(self, x):
            return x + 1, x - 1

    def __init__(self):
        super().__init__()
        self.pair = self.Pair()

    def forward(self, x):
        return torch.stack(self.pair(x))


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return self.lin(torch.relu(self.lin(x))).sum()


class _WithBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("scale", torch.full((4,), 2.0), persistent=False)
        self.register_buffer("shift", torch.ones(4))

    def forward(self, x):
        return (self.lin(x) * self.scale + self.shift).sum()


def test_refused_graphs():
    x = torch.ones(2, 4)
    with pytest.raises(InputError, match="non-tensor value from tensor data"):
        opgraph.trace(_ItemUser(), (x,))
    with pytest.raises(InputError, match="uses whole"):
        opgraph.trace(_TupleUser(), (x,), leaf_modules=(_TupleUser.Pair,))
    with pytest.raises(InputError, match="2 example inputs"):
        opgraph.trace(_Tied(), (x, x))
    with pytest.raises(InputError, match="tensors"):
        opgraph.trace(_Tied(), (3,))
    with pytest.raises(ConfigError, match="leaf_modules"):
        opgraph.trace(_Tied(), (x,), leaf_modules=(int,))
    tied = opgraph.trace(_Tied(), (x,))
    n = len(tied.ops)
    with pytest.raises(PlanError, match="parameter 'lin.weight' is used by stages 0 and 1"):
        tied.split([0, 3, n])
    assert len(tied.split([0, n])) == 1


def test_non_persistent_buffers_stay_unsaved():
    m = _WithBuffer()
    traced = opgraph.trace(m, (torch.ones(2, 4),))
    (stage,) = traced.split([0, len(traced.ops)])
    assert sorted(stage.state_dict()) == sorted(m.state_dict())  # no "scale"
    assert sorted(traced.gm.state_dict()) == sorted(m.state_dict())
    assert torch.equal(stage({"x": torch.ones(2, 4)})[OUTPUT], m(torch.ones(2, 4)))


def test_training_module_builders_refuse_bad_input():
    from transformers import GPT2Config

    with pytest.raises(InputError, match="DemoLM"):
        opgraph.demo_training_module(nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="tie_word_embeddings"):
        opgraph.gpt2_training_module(GPT2Config(n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(InputError, match="GPT2Config"):
        opgraph.gpt2_training_module({"n_embd": 8})
