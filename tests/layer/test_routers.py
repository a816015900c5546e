"""Every router against a straightforward per-token reference written from the papers."""

import math

import pytest
import torch

from moeflow import MoEConfig
from moeflow.errors import RoutingError
from moeflow.layer.routers import assignments_from_topk, build_router, load_balancing_loss, z_loss

D, E, T = 12, 8, 37


def _cfg(**kw):
    base = dict(hidden_size=D, ffn_hidden_size=16, num_experts=E, top_k=2)
    base.update(kw)
    return MoEConfig(**base)


def _pairs(routing):
    """{(token, expert): weight} from a Routing."""
    return {
        (int(t), int(e)): float(w)
        for t, e, w in zip(routing.token_idx_N, routing.expert_idx_N, routing.weight_N.detach())
    }


def _check_sorted(routing):
    e = routing.expert_idx_N
    assert torch.all(e[1:] >= e[:-1])
    assert torch.equal(routing.counts_E, torch.bincount(e, minlength=E))
    for ex in range(E):  # token order kept inside an expert
        toks = routing.token_idx_N[e == ex]
        assert torch.all(toks[1:] > toks[:-1])


def _reference_topk(scores_row, k):
    order = sorted(range(len(scores_row)), key=lambda i: -scores_row[i])
    return order[:k]


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(T, D)


@pytest.mark.parametrize("norm", [True, False])
def test_softmax_topk_matches_reference(x, norm):
    r = build_router(_cfg(router="softmax_topk", norm_topk_prob=norm))
    out = r(x)
    _check_sorted(out)
    logits = (x @ r.weight.t()).tolist()
    want = {}
    for t, row in enumerate(logits):
        m = max(row)
        p = [math.exp(v - m) for v in row]
        s = sum(p)
        p = [v / s for v in p]
        top = _reference_topk(p, 2)
        z = sum(p[i] for i in top) if norm else 1.0
        for i in top:
            want[(t, i)] = p[i] / z
    got = _pairs(out)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6)


def test_noisy_gating_only_in_training(x):
    r = build_router(_cfg(router="softmax_topk", noisy_gating=True))
    torch.nn.init.normal_(r.noise_weight, std=1.0)
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.weight_N, b.weight_N)
    r.train()
    torch.manual_seed(1)
    c = r(x)
    torch.manual_seed(2)
    d = r(x)
    assert not (
        torch.equal(c.expert_idx_N, d.expert_idx_N) and torch.allclose(c.weight_N, d.weight_N)
    )


def test_switch_top1_capacity_and_drop(x):
    cfg = _cfg(router="switch", top_k=1, capacity_factor=1.0)
    r = build_router(cfg)
    out = r(x)
    cap = math.ceil(1.0 * 1 * T / E)
    assert int(out.counts_E.max()) <= cap
    probs = torch.softmax(x @ r.weight.t(), -1)
    best = probs.argmax(-1)
    # reference: walk tokens in order, each expert accepts until full
    load = [0] * E
    want = {}
    for t in range(T):
        e = int(best[t])
        if load[e] < cap:
            load[e] += 1
            want[(t, e)] = float(probs[t, e].detach())
    got = _pairs(out)
    assert got.keys() == want.keys()
    assert out.num_dropped == T - len(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5)


def test_capacity_priority_is_first_choice_first():
    # 4 tokens all want expert 0 first and expert 1 second; capacity 2 per expert.
    idx = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    w = torch.full((4, 2), 0.5)
    tok, exp, _, counts, dropped = assignments_from_topk(idx, w, num_experts=4, capacity_factor=1.0)
    # capacity = ceil(1 * 2 * 4 / 4) = 2
    assert counts.tolist() == [2, 2, 0, 0]
    assert dropped == 4
    assert tok.tolist() == [0, 1, 0, 1] and exp.tolist() == [0, 0, 1, 1]


def test_sigmoid_router_scales_by_sigmoid_of_logit(x):
    r = build_router(_cfg(router="sigmoid"))
    out = r(x)
    logits = x @ r.weight.t()
    want = {}
    for t in range(T):
        for i in _reference_topk(logits[t].tolist(), 2):
            want[(t, i)] = 1 / (1 + math.exp(-float(logits[t, i])))
    got = _pairs(out)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5)


def test_xmoe_cosine_in_low_dim(x):
    r = build_router(_cfg(router="xmoe", xmoe_dim=4))
    out = r(x)
    z = x @ r.proj.t()
    tau = math.exp(float(r.log_tau))
    want = {}
    for t in range(T):
        zt = z[t] / z[t].norm()
        s = [float(zt @ (r.expert_emb[e] / r.expert_emb[e].norm())) / tau for e in range(E)]
        assert all(abs(v) * tau <= 1 + 1e-5 for v in s)  # cosines
        m = max(s)
        p = [math.exp(v - m) for v in s]
        p = [v / sum(p) for v in p]
        top = _reference_topk(p, 2)
        for i in top:
            want[(t, i)] = p[i] / sum(p[j] for j in top)
    got = _pairs(out)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-4)


def test_expert_choice_each_expert_picks_top_tokens(x):
    r = build_router(_cfg(router="expert_choice", capacity_factor=1.0))
    out = r(x)
    _check_sorted(out)
    cap = math.ceil(2 * T / E)
    assert out.counts_E.tolist() == [cap] * E
    probs = torch.softmax(x @ r.weight.t(), -1)
    want = {}
    for e in range(E):
        col = probs[:, e].tolist()
        for t in _reference_topk(col, cap):
            want[(t, e)] = col[t]
    got = _pairs(out)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5)


@pytest.mark.parametrize(
    "score_func,bias,norm,scale",
    [
        ("sigmoid", True, True, 2.5),  # DeepSeek-V3
        ("softmax", False, False, 16.0),  # DeepSeek-V2
    ],
)
def test_deepseek_group_limited(x, score_func, bias, norm, scale):
    cfg = _cfg(
        router="deepseek",
        n_group=4,
        topk_group=2,
        score_func=score_func,
        correction_bias=bias,
        norm_topk_prob=norm,
        routed_scaling_factor=scale,
        top_k=3,
    )
    r = build_router(cfg)
    if bias:
        r.correction_bias.copy_(torch.randn(E) * 0.3)
    out = r(x)
    _check_sorted(out)
    logits = x @ r.weight.t()
    want = {}
    per = E // 4
    for t in range(T):
        row = logits[t].tolist()
        if score_func == "sigmoid":
            s = [1 / (1 + math.exp(-v)) for v in row]
        else:
            m = max(row)
            ex = [math.exp(v - m) for v in row]
            s = [v / sum(ex) for v in ex]
        c = [s[i] + (float(r.correction_bias[i]) if bias else 0.0) for i in range(E)]
        groups = []
        for g in range(4):
            vals = sorted(c[g * per : (g + 1) * per], reverse=True)
            groups.append(sum(vals[:2]) if score_func == "sigmoid" else vals[0])
        keep_groups = _reference_topk(groups, 2)
        eligible = [i for i in range(E) if i // per in keep_groups]
        top = sorted(eligible, key=lambda i: -c[i])[:3]
        z = sum(s[i] for i in top) if norm else 1.0
        for i in top:
            want[(t, i)] = s[i] / z * scale
    got = _pairs(out)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5)


def test_deepseek_bias_update_moves_toward_balance():
    r = build_router(_cfg(router="deepseek", n_group=1, topk_group=1, correction_bias=True))
    r.update_correction_bias(torch.tensor([10, 0, 5, 5, 5, 5, 5, 5]), rate=0.1)
    assert float(r.correction_bias[0]) < 0 < float(r.correction_bias[1])


def test_losses_reference():
    probs = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8]])
    idx = torch.tensor([[0], [0], [1]])
    # f = [2/3, 1/3], P = [0.5, 0.5] -> 2 * (2/3*0.5 + 1/3*0.5) = 1
    assert float(load_balancing_loss(probs, idx, 2)) == pytest.approx(1.0)
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    want = (math.log(2) ** 2 + math.log(math.exp(1) + math.exp(2)) ** 2) / 2
    assert float(z_loss(logits)) == pytest.approx(want, rel=1e-6)


def test_aux_loss_uses_coefficients(x):
    r = build_router(_cfg(aux_loss_coef=0.5, z_loss_coef=0.25))
    out = r(x)
    logits = x @ r.weight.t()
    probs = torch.softmax(logits, -1)
    idx = torch.topk(probs, 2, -1)[1]
    want = 0.5 * load_balancing_loss(probs, idx, E) + 0.25 * z_loss(logits)
    assert float(out.aux_loss) == pytest.approx(float(want), rel=1e-5)
    out.aux_loss.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_raise(x, bad):
    r = build_router(_cfg())
    with torch.no_grad():
        r.weight[0, 0] = bad
    with pytest.raises(RoutingError, match="not finite"):
        r(x)


def test_token_choice_routers_share_the_top_k_base_and_expert_choice_does_not(x):
    from moeflow.layer.routers import ROUTER_CLASSES, ExpertChoiceRouter, Router, TopKRouter

    for name, cls in ROUTER_CLASSES.items():
        assert issubclass(cls, Router), name
        assert issubclass(cls, TopKRouter) == (name != "expert_choice"), name
    # expert choice has no per-token selection to call or to override
    ec = build_router(_cfg(router="expert_choice", aux_loss_coef=0.5))
    assert not hasattr(ec, "select") and not hasattr(ec, "_finish")
    assert isinstance(ec, ExpertChoiceRouter)
    # every expert takes the same number of tokens, so the balancing loss is not added
    r = ec(x)
    assert float(r.aux_loss) == 0.0 and bool((r.counts_E == r.counts_E[0]).all())
    # the gate alone cannot route: forward is abstract on Router
    with pytest.raises(TypeError):
        Router(_cfg())


def test_top_k_base_drives_select(x):
    # a new token-choice router only writes select(); capacity, sorting and losses come along
    from moeflow.layer.routers import TopKRouter

    class FirstK(TopKRouter):
        def select(self, x_TD):
            logits_TE = self.logits(x_TD)
            idx_TK = torch.arange(self.top_k).expand(x_TD.shape[0], -1)
            return logits_TE, torch.softmax(logits_TE, -1), idx_TK, torch.ones(idx_TK.shape)

    r = FirstK(_cfg(capacity_factor=1.0, aux_loss_coef=1.0))(x)
    cap = math.ceil(1.0 * 2 * T / E)
    assert r.counts_E.tolist() == [cap, cap] + [0] * (E - 2)
    assert r.num_dropped == 2 * T - 2 * cap
    _check_sorted(r)
    assert float(r.aux_loss) > 0
