import math

import pytest

from moeflow.perf import perf_preset
from moeflow.plan import LayerWorkload, baselines


def w(**kw):
    base = dict(B=2, L=1024, M=2048, H=8192, E=8, k=2, f=1.2, n_ep=8, n_esp=4)
    base.update(kw)
    return LayerWorkload(**base)


def test_deepspeed_is_r1_with_all_gradients_at_the_end():
    perf = perf_preset("fsmoe-testbed-b")
    p = baselines.deepspeed_moe(w(), perf, num_layers=3)
    assert p.degrees() == [(1, 1)] * 3
    assert p.tail_ar_bytes == pytest.approx(3 * w().grad_bytes)


def test_tutel_fixed_degree():
    p = baselines.tutel(w(), perf_preset("fsmoe-testbed-a"), r=4, num_layers=2)
    assert p.degrees() == [(4, 4), (4, 4)]


def test_pipemoe_closed_form():
    perf = perf_preset("fsmoe-testbed-a")
    x = w(n_esp=1)
    pc = x.pass_cost(perf)
    if 2 * pc.work_a2a >= pc.work_exp:
        r = math.sqrt(pc.work_exp / (2 * pc.alpha_a2a))
    else:
        r = math.sqrt(2 * pc.work_a2a / pc.alpha_exp)
    assert baselines.pipemoe_degree(x, perf) == min(max(round(r), 1), 16)


def test_lina_fixed_chunks_and_greedy_gradients():
    perf = perf_preset("fsmoe-testbed-a")
    x = w()
    assert baselines.lina_degree(x, chunk_bytes=x.a2a_bytes / 3) == 3
    assert baselines.lina_degree(x, chunk_bytes=1.0) == 16
    p = baselines.lina(x, perf, num_layers=3)
    assert p.layers[-1].gar_bytes == 0.0
    assert p.tail_ar_bytes + sum(lp.gar_bytes for lp in p.layers) == pytest.approx(3 * x.grad_bytes)
