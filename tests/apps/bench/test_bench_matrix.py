"""The rest of the dissection matrix: LoRA (peft), ZeRO-3 (FSDP2), weight-only int8 (torchao)
and the SDPA back-ends, each run on a tiny step and predicted from a PerfModel."""

import sys

import pytest
import torch

from moeflow.apps.bench import Setting, Shape, build_workload
from moeflow.apps.bench.dissect import run_step
from moeflow.apps.bench.matrix import SDPA_BACKENDS, available_sdpa, lora_targets
from moeflow.errors import ConfigError
from tests.apps.bench.conftest import TINY

SHAPE = Shape(batch=2, seq_len=16)


def _losses(w, steps=3) -> list[float]:
    out = []
    for _ in range(steps):
        loss = w.loss(w.logits(w.ids_BL))
        out.append(loss.item())
        loss.backward()
        w.opt.step()
        w.opt.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("kind", ["demo", "decoder"])
def test_lora_trains_only_the_adapters(kind):
    pytest.importorskip("peft")
    base = build_workload(kind, "train", Setting(), SHAPE, dims=TINY)
    targets = lora_targets(base.model)
    w = build_workload(kind, "train", Setting(finetune="lora"), SHAPE, dims=TINY)
    assert w.units["lora"] == len(targets) > 0
    names = [n for n, p in w.model.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert len(names) == 2 * len(targets)
    opt_params = {id(p) for g in w.opt.param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in w.model.parameters() if p.requires_grad}
    # B starts at zero: the adapted model computes the base model's loss
    with torch.no_grad():
        l0 = base.loss(base.logits(base.ids_BL)).item()
        l1 = w.loss(w.logits(w.ids_BL)).item()
    assert l1 == pytest.approx(l0, rel=1e-6)
    frozen = {n: p.detach().clone() for n, p in w.model.named_parameters() if not p.requires_grad}
    adapters = {n: p.detach().clone() for n, p in w.model.named_parameters() if p.requires_grad}
    run_step(w)
    after = dict(w.model.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())
    assert any(not torch.equal(after[n], v) for n, v in adapters.items())


def test_zero3_step_equals_the_unsharded_step():
    """FSDP2 on a world of one (what ``moeflow bench`` runs): the same losses, step by step."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from moeflow.apps.bench.matrix import release_group

    ref = _losses(build_workload("demo", "train", Setting(), SHAPE, dims=TINY))
    try:
        w = build_workload("demo", "train", Setting(zero3=True), SHAPE, dims=TINY)
        assert dist.get_world_size() == 1
        assert w.units["zero3"] == TINY["num_layers"] + 1
        assert all(isinstance(p, DTensor) for p in w.model.parameters())
        assert _losses(w) == pytest.approx(ref, rel=1e-5)
    finally:
        release_group()
    assert not dist.is_initialized()


def _zero3_rank(rank, world, shape, dims):
    torch.manual_seed(0)
    w = build_workload("demo", "train", Setting(zero3=True), shape, dims=dims)
    shard = sum(p.to_local().numel() for p in w.model.parameters())
    return _losses(w), shard


@pytest.mark.dist
def test_zero3_on_two_gloo_ranks_equals_the_unsharded_step():
    """Sharded over two ranks that see the same batch, each rank holds half the parameters
    and the averaged gradients are the single process's: the same losses."""
    from tests._dist import run_ranks

    base = build_workload("demo", "train", Setting(), SHAPE, dims=TINY)
    total = sum(p.numel() for p in base.model.parameters())
    ref = _losses(base)
    out = run_ranks(_zero3_rank, 2, SHAPE, TINY)
    for losses, _ in out:
        assert losses == pytest.approx(ref, rel=1e-5)
    assert sum(s for _, s in out) >= total > max(s for _, s in out)


@pytest.mark.parametrize("kind", ["demo", "decoder"])
def test_int8_decode_is_within_tolerance_of_fp32(kind):
    """Weight-only int8 (per-channel symmetric) keeps the decode logits within 2% (relative
    L2) of the fp32 model's."""
    pytest.importorskip("torchao")
    ref = build_workload(kind, "decode", Setting(), SHAPE, dims=TINY)
    w = build_workload(kind, "decode", Setting(quant="int8"), SHAPE, dims=TINY)
    assert w.units["int8"] > 0
    quantized = [
        m
        for m in w.model.modules()
        if isinstance(m, torch.nn.Linear) and "Int8" in type(m.weight).__name__
    ]
    assert len(quantized) == w.units["int8"]
    with torch.no_grad():
        ref.before_step()
        w.before_step()
        a = ref.decode_forward().float()
        b = w.decode_forward().float()
    err = ((a - b).norm() / a.norm()).item()
    assert 0 < err < 2e-2


@pytest.mark.parametrize("backend", [b for b in SDPA_BACKENDS if b != "default"])
def test_sdpa_backend_runs_the_same_step_or_is_refused(backend):
    if backend not in available_sdpa():
        with pytest.raises(ConfigError, match="sdpa"):
            build_workload("demo", "train", Setting(sdpa=backend), SHAPE, dims=TINY)
        return
    ref = _losses(build_workload("demo", "train", Setting(), SHAPE, dims=TINY))
    w = build_workload("demo", "train", Setting(sdpa=backend, recompute=True), SHAPE, dims=TINY)
    assert _losses(w) == pytest.approx(ref, rel=1e-5)


def test_math_backend_runs_no_fused_kernel():
    from torch.profiler import profile

    w = build_workload("demo", "train", Setting(sdpa="math"), SHAPE, dims=TINY)
    with profile() as prof:
        run_step(w)
    names = {e.name for e in prof.events()}
    assert "aten::_scaled_dot_product_attention_math" in names
    assert not any("flash" in n for n in names)


def test_matrix_factors_refused_where_the_mode_has_no_use_for_them():
    with pytest.raises(ConfigError, match="quant"):
        build_workload("demo", "train", Setting(quant="int8"), SHAPE, dims=TINY)
    with pytest.raises(ConfigError, match="finetune"):
        build_workload("demo", "decode", Setting(finetune="lora"), SHAPE, dims=TINY)
    with pytest.raises(ConfigError, match="zero3"):
        build_workload("demo", "decode", Setting(zero3=True), SHAPE, dims=TINY)
    with pytest.raises(ConfigError, match="sdpa"):
        Setting(sdpa="fastest")


def test_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)
    with pytest.raises(ImportError, match=r"moeflow\[bench\]"):
        build_workload("demo", "train", Setting(finetune="lora"), SHAPE, dims=TINY)


def test_labels_keep_the_old_settings_and_name_the_new():
    assert Setting().label == "grouped_mm/fp32/rc-off/compile-off"
    assert Setting(finetune="lora", zero3=True, sdpa="math").label.endswith("/lora/zero3/sdpa-math")
    assert Setting(quant="int8").to_dict()["quant"] == "int8"


def _synthetic_perf():
    """Every fit the bench reads, assumed (no profiling): GEMMs 1 ns/FLOP, 1 us per other
    operator."""
    from moeflow.apps.bench.predict import OP_CLASSES
    from moeflow.perf.cost import LinearCost, PerfModel

    costs = {
        f"{c}@float32": LinearCost(1e-3, 0.0, source="assumed").to_dict()
        for c in ("elementwise", *OP_CLASSES)
    }
    for k in ("gemm", "grouped_gemm_wgrad", "attention_bwd"):
        costs[f"{k}@float32"] = LinearCost(0.0, 1e-9, source="assumed").to_dict()
    costs["python_op"] = LinearCost(2e-3, 0.0, source="assumed").to_dict()
    return PerfModel(
        name="synthetic", costs={"gemm": LinearCost(0.0, 1e-9)}, meta={"bench_costs": costs}
    )


MATRIX = [
    ("train", Setting(finetune="lora")),
    ("train", Setting(zero3=True)),
    ("train", Setting(sdpa="math")),
    ("train", Setting(sdpa="flash")),
    ("decode", Setting(quant="int8")),
    ("decode", Setting(sdpa="math")),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode,setting", MATRIX, ids=[s.label for _, s in MATRIX])
def test_every_matrix_setting_is_run_and_predicted(mode, setting):
    """bench() runs the setting on a tiny step and predicts it from the PerfModel, whose
    calibrated unit costs and fits name their factor."""
    pytest.importorskip("peft")
    pytest.importorskip("torchao")
    from moeflow.apps.bench import BenchJob, bench
    from moeflow.apps.bench.predict_matrix import factors, unit_key, with_matrix_costs

    perf = with_matrix_costs(_synthetic_perf(), [setting], mode)
    for _, name in factors(setting):
        entry = perf.meta["bench_costs"][unit_key(name, "float32", mode)]
        assert entry["source"] == "calibrated" and entry["units"] > 0
        assert set(entry["measured_ms"]) == {"base", "factor"}
    if setting.sdpa == "math":
        assert "attention_math@float32" in perf.meta["bench_costs"]
    job = BenchJob(
        mode=mode,
        shape=SHAPE,
        settings=[setting],
        dims=TINY,
        warmup=1,
        steps=1,
        unprofiled=1,
        perf=perf,
        peak_flops={"float32": 1e11},
        count=False,
        progress=False,
    )
    rep = bench(job)
    (res,) = rep["settings"]
    assert res["status"] == "ok", res["error"]
    pred = res["prediction"]
    assert pred["predicted_ms"] > 0 and pred["ratio"] > 0
    assert pred["units"] and set(pred["unit_costs"]) == {n for _, n in factors(setting)}
    rows = sum(r["predicted_ms"] for r in pred["rows"])
    assert pred["predicted_ms"] == pytest.approx(rows)


def test_sdpa_math_is_priced_by_its_own_fit():
    """Under the math back-end each SDPA record gets ``attention_math`` per score element on
    top of its GEMMs: doubling that fit's beta adds exactly the score elements once more."""
    from moeflow.apps.bench.dissect import dissect
    from moeflow.apps.bench.predict_matrix import sdpa_math_rows
    from moeflow.perf.cost import LinearCost

    w = build_workload("demo", "train", Setting(sdpa="math"), SHAPE, dims=TINY)
    d = dissect(w, warmup=1, steps=1, unprofiled=1)
    recs = [
        r
        for r in d.inventory
        if r.name == "aten::scaled_dot_product_attention" and r.phase == "forward"
    ]
    assert len(recs) == TINY["num_layers"] and all(r.gemms for r in recs)
    B, H, L = SHAPE.batch, TINY["num_heads"], SHAPE.seq_len
    scores = len(recs) * B * H * L * L
    perf = _synthetic_perf()
    table = perf.meta["bench_costs"]
    table["attention_math@float32"] = LinearCost(0.0, 1e-8).to_dict()
    a = sum(sdpa_math_rows(d, perf, "float32").values())
    table["attention_math@float32"] = LinearCost(0.0, 2e-8).to_dict()
    b = sum(sdpa_math_rows(d, perf, "float32").values())
    assert b - a == pytest.approx(scores * 1e-8)
    del table["attention_math@float32"]
    with pytest.raises(ConfigError, match="attention_math"):
        sdpa_math_rows(d, perf, "float32")


def test_int8_dequantization_is_priced_by_its_own_fit():
    """Every quantized weight's dequantization is found in the inventory by its shape."""
    pytest.importorskip("torchao")
    from moeflow.apps.bench.dissect import dissect
    from moeflow.apps.bench.predict_matrix import int8_rows
    from moeflow.perf.cost import LinearCost

    w = build_workload("demo", "decode", Setting(quant="int8"), SHAPE, dims=TINY)
    d = dissect(w, warmup=1, steps=1, unprofiled=1)
    perf = _synthetic_perf()
    table = perf.meta["bench_costs"]
    table["int8_dequant@float32"] = LinearCost(0.0, 1e-6).to_dict()
    a = sum(int8_rows(d, perf, "float32", w.units["int8_weights"]).values())
    table["int8_dequant@float32"] = LinearCost(0.0, 2e-6).to_dict()
    b = sum(int8_rows(d, perf, "float32", w.units["int8_weights"]).values())
    elements = sum(n * k for n, k in w.units["int8_weights"])
    assert b - a == pytest.approx(elements * 1e-6)


def _cli(*argv):
    import argparse

    from moeflow.cli.bench import add_bench_arguments, build_job

    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    return build_job(p.parse_args(list(argv)))


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["train", "--finetune", "qlora"], "--finetune"),
        (["train", "--zero3", "maybe"], "--zero3"),
        (["train", "--quant", "int4"], "--quant"),
        (["train", "--quant", "int8"], "--quant"),
        (["decode", "--finetune", "lora"], "--finetune"),
        (["decode", "--zero3", "on"], "--zero3"),
        (["train", "--sdpa", "fastest"], "--sdpa"),
        (["train", "--nproc", "2", "--zero3", "off", "on"], "--zero3"),
    ],
)
def test_cli_refuses_bad_matrix_flags(argv, flag):
    with pytest.raises(ConfigError, match=flag):
        _cli(*argv)


def test_cli_refuses_an_sdpa_backend_this_build_cannot_run():
    missing = [b for b in SDPA_BACKENDS if b not in available_sdpa()]
    if not missing:
        pytest.skip("every SDPA back-end runs here")
    with pytest.raises(ConfigError, match="--sdpa"):
        _cli("train", "--sdpa", missing[0])


def test_cli_grid_one_factor_at_a_time():
    job = _cli(
        "train", "--finetune", "full", "lora", "--zero3", "off", "on", "--sdpa", "default", "math"
    )
    labels = [s.label for s in job.settings]
    assert labels == [
        "grouped_mm/fp32/rc-off/compile-off",
        "grouped_mm/fp32/rc-off/compile-off/lora",
        "grouped_mm/fp32/rc-off/compile-off/zero3",
        "grouped_mm/fp32/rc-off/compile-off/sdpa-math",
    ]
    job = _cli("decode", "--quant", "none", "int8")
    assert [s.quant for s in job.settings] == ["none", "int8"]


def test_unit_costs_are_calibrated_on_a_model_of_the_workloads_kind():
    from moeflow.apps.bench.predict_matrix import unit_key

    assert unit_key("int8", "float32", "decode", "demo") == "int8_unit@float32/decode/demo"
    assert unit_key("int8", "float32", "decode", "decoder").endswith("/decoder")
    assert unit_key("int8", "float32", "decode", "hf").endswith("/decoder")


@pytest.mark.slow
def test_cli_calibrates_and_reports_a_matrix_setting(tmp_path):
    """``moeflow bench train --finetune full lora --perf P``: the matrix costs are
    calibrated into the PerfModel before the run, and the report predicts the LoRA setting."""
    import argparse
    import json

    from moeflow.apps.bench.report import validate_report
    from moeflow.cli.bench import add_bench_arguments, run_bench

    pytest.importorskip("peft")
    perf = tmp_path / "perf.json"
    _synthetic_perf().save(str(perf))
    out = tmp_path / "r.json"
    p = argparse.ArgumentParser()
    add_bench_arguments(p)
    argv = ["train", "--dim", "32", "--layers", "1", "--experts", "4", "--ffn", "64"]
    argv += ["--batch-size", "2", "--seq-len", "16", "--warmup", "1", "--steps", "1"]
    argv += ["--unprofiled", "1", "--finetune", "full", "lora", "--perf", str(perf)]
    argv += ["--json", str(out), "--quiet", "--no-count", "--peak-tflops", "0.1"]
    assert run_bench(p.parse_args(argv)) == 0
    rep = json.loads(out.read_text())
    validate_report(rep)
    lora = [s for s in rep["settings"] if s["setting"]["finetune"] == "lora"]
    assert len(lora) == 1 and lora[0]["prediction"]["unit_costs"]["lora"]["units"] > 0
    assert "lora_unit@float32/train/demo" in rep["perf_model"]["meta"]["bench_costs"]
