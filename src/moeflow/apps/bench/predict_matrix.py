"""Predict the settings of :mod:`moeflow.apps.bench.matrix` with the same PerfModel.

The step's work comes from its operator inventory and is priced by
:func:`moeflow.apps.bench.predict.predict_rows`, as for every other setting; each factor then
adds what the inventory's operators do not carry:

* **SDPA ``math``** runs the attention as a chain of operators inside one top-level
  ``aten::scaled_dot_product_attention`` whose inventory record lists only its two batched
  GEMMs (the scaling, mask and softmax between them are not priced). ``attention_math@<dtype>``
  prices that rest per element of the score matrix (:func:`profile_attention_math`);
* **weight-only int8** dequantizes each weight on every call (torchao's CPU path:
  ``w_int8.t().to(dtype)``, then ``mm`` and the per-channel scale): the ``aten::to`` of a
  quantized weight's shape is repriced with ``int8_dequant@<dtype>``, ``alpha + beta *
  elements`` of that conversion;
* **a fixed cost per unit** (an adapted Linear for LoRA, an FSDP unit for ZeRO-3, a quantized
  Linear, a block under a forced SDPA back-end): the Python machinery of the library around
  its operators (peft's adapter loop and module calls, FSDP2's pre/post forward and backward
  hooks and DTensor bookkeeping) which no operator of the inventory carries. It is
  calibrated on a small model of the workload's kind (:data:`CAL_DIMS`, :data:`CAL_SHAPE`;
  the demo model for ``demo``, ``MoEDecoder`` for ``decoder`` and ``hf``: never the timed
  workload) as the difference of the prediction's residuals with and without the factor,
  divided by the units (:func:`calibrate_unit`), stored as ``<factor>_unit@<dtype>/<mode>/<model>``
  and charged to the forward phase's row of the factor (:data:`UNIT_ROW`: the calibration
  times whole steps).

Every fit lives in ``PerfModel.meta["bench_costs"]`` next to the fits of
:mod:`moeflow.apps.bench.predict`; a model that lacks one raises :class:`ConfigError` naming
it.
"""

from __future__ import annotations

import statistics
from functools import partial

import torch

from moeflow.apps.bench.dissect import StepDissection
from moeflow.apps.bench.predict import (
    ESIZE,
    OP_CLASSES,
    _cost,
    predict_rows,
    row_table,
    step_graph,
)
from moeflow.apps.bench.workloads import Setting, Shape
from moeflow.errors import ConfigError
from moeflow.perf.cost import LinearCost, PerfModel
from moeflow.perf.measure import fit, time_ms
from moeflow.sim import simulate

#: the calibration model of the per-unit costs (not the bench's workload)
CAL_DIMS = {
    "dim": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_experts": 4,
    "top_k": 2,
    "ffn_hidden_size": 128,
}
CAL_SHAPE = Shape(batch=2, seq_len=32)
#: the row a factor's fixed cost is charged to
UNIT_ROW = {"lora": "attention", "zero3": "other", "int8": "attention", "sdpa": "attention"}
#: (rows, K) of the int8 dequantization sweep: the weight seen transposed, as torchao reads it
DEQUANT_SHAPES = tuple((n, k) for n in (64, 256, 1024) for k in (64, 256, 1024))


def factors(setting: Setting) -> list[tuple[str, str]]:
    """(unit kind, cost name) of each matrix factor of ``setting``."""
    out = []
    if setting.finetune == "lora":
        out.append(("lora", "lora"))
    if setting.zero3:
        out.append(("zero3", "zero3"))
    if setting.quant == "int8":
        out.append(("int8", "int8"))
    if setting.sdpa != "default":
        out.append(("sdpa", f"sdpa_{setting.sdpa}"))
    return out


def cal_kind(kind: str) -> str:
    """The calibration model of a workload kind: the demo model for ``demo`` (no KV cache),
    :class:`moeflow.models.MoEDecoder` for ``decoder`` and ``hf`` (cached decode)."""
    return "demo" if kind == "demo" else "decoder"


def unit_key(name: str, dtype: str, mode: str, kind: str = "demo") -> str:
    return f"{name}_unit@{dtype}/{mode}/{cal_kind(kind)}"


# -- fits --------------------------------------------------------------------------------
def profile_attention_math(perf: PerfModel, dtype: str, trials: int = 5) -> LinearCost:
    """``attention_math@<dtype>``: ``alpha + beta * score elements`` (``B * H * Lq * Lk``) of
    causal SDPA under ``sdpa_kernel(MATH)`` beyond its two batched GEMMs, which keep their
    price from ``perf``'s GEMM fit: the scaling, causal mask and softmax over the score
    matrix, memory-bound work that grows with the scores, not with the head dimension.
    Batches 1 and 8, 4 heads, L in {64, 128, 256}, head dims 32 and 64; relative least
    squares."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    td = getattr(torch, dtype)
    g = _cost(perf, "gemm", dtype)
    gen = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for B in (1, 8):
        for L in (64, 128, 256):
            for d in (32, 64):
                q, k, v = (torch.randn(B, 4, L, d, generator=gen).to(td) for _ in range(3))
                fn = partial(F.scaled_dot_product_attention, q, k, v, is_causal=True)
                with sdpa_kernel(SDPBackend.MATH):
                    t = time_ms(fn, trials=trials)
                gemms = 2 * g(2.0 * B * 4 * L * L * d)
                xs.append(float(B * 4 * L * L))
                ys.append(max(t - gemms, 1e-6))
    return fit(
        xs,
        ys,
        relative=True,
        note=f"score elements, causal SDPA math back-end minus its two GEMMs (gemm@{dtype}), "
        f"{len(xs)} shapes, relative least squares, {torch.get_num_threads()} threads",
    )


def profile_int8_dequant(dtype: str, trials: int = 5) -> LinearCost:
    """``int8_dequant@<dtype>``: ``alpha + beta * elements`` of ``w.t().to(dtype)`` for an
    ``int8`` weight of :data:`DEQUANT_SHAPES` (out of cache, as a step reads each weight
    once). Relative least squares."""
    td = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    xs, ys = [], []
    for n, k in DEQUANT_SHAPES:
        w = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        xs.append(float(n * k))
        ys.append(time_ms(partial(lambda w: w.t().to(td), w), trials=trials, cold=True))
    return fit(
        xs,
        ys,
        relative=True,
        note=f"elements, int8 weight .t().to({dtype}), {len(xs)} shapes, relative least "
        f"squares, {torch.get_num_threads()} threads",
    )


def _phase_ms(d: StepDissection) -> dict:
    """Measured ms per phase, the profiler's rows scaled to the plain step (as
    :func:`moeflow.apps.bench.predict.compare` scales them)."""
    scale = d.unprofiled_ms / d.step_ms if d.step_ms > 0 else 1.0
    out: dict = {}
    for (phase, _), v in d.rows.items():
        out[phase] = out.get(phase, 0.0) + v * scale
    return out


def calibrate_unit(
    perf: PerfModel, setting: Setting, mode: str, kind: str = "demo", *, rounds: int = 40
) -> dict[str, dict]:
    """{unit key: entry} of the one matrix factor of ``setting``: its fixed cost per unit,
    ``(measured difference - predicted difference) / units`` between the step with the
    factor and without it, on the calibration model of ``kind`` (:func:`cal_kind`) at
    :data:`CAL_DIMS` and :data:`CAL_SHAPE`. The predictions price
    each step's inventory (one dissected step each); the measured difference is the median
    over ``rounds`` rounds of one plain step of each (no profiler, no hooks, the first arm
    alternating) of their difference, so that a change of the machine's load between
    rounds cancels."""
    from moeflow.apps.bench import matrix
    from moeflow.apps.bench.dissect import _timed_step, dissect
    from moeflow.apps.bench.workloads import build_workload

    fs = factors(setting)
    if len(fs) != 1:
        raise ConfigError("setting", setting.label, "exactly one LoRA, ZeRO-3, int8 or SDPA factor")
    factor, name = fs[0]
    model = cal_kind(kind)
    base = Setting(kernel=setting.kernel, dtype=setting.dtype)
    try:
        ws = {
            s: build_workload(model, mode, s, CAL_SHAPE, dims=CAL_DIMS, seed=1)
            for s in (base, setting)
        }
        pred = {}
        for s, w in ws.items():
            d = dissect(w, warmup=1, steps=1, unprofiled=1)
            pred[s] = sum(predict_matrix_rows(d, perf, s, w.units, fixed=False, kind=kind).values())
        for w in ws.values():
            _timed_step(w)
        diffs, times = [], {base: [], setting: []}
        for r in range(rounds):
            t = {}
            for s in (base, setting) if r % 2 == 0 else (setting, base):
                t[s] = _timed_step(ws[s])
                times[s].append(t[s])
            diffs.append(t[setting] - t[base])
        units = max(1, ws[setting].units[factor])
    finally:
        if setting.zero3:
            matrix.release_group()
    m = {s: statistics.median(t) for s, t in times.items()}
    unit = (statistics.median(diffs) - (pred[setting] - pred[base])) / units
    return {
        unit_key(name, setting.dtype, mode, kind): {
            "alpha": unit,
            "measured_ms": {"base": m[base], "factor": m[setting]},
            "predicted_ms": {"base": pred[base], "factor": pred[setting]},
            "units": units,
            "source": "calibrated",
            "note": f"ms per {factor} unit per step beyond the priced operators: residual "
            f"difference on {model} {CAL_DIMS} batch {CAL_SHAPE.batch} x {CAL_SHAPE.seq_len}, "
            f"median of {rounds} paired differences of plain steps taking turns, "
            f"{torch.get_num_threads()} threads",
        }
    }


def with_matrix_costs(perf: PerfModel, settings, mode: str, kind: str = "demo") -> PerfModel:
    """``perf`` plus the fits and unit costs the matrix factors of ``settings`` need on a
    workload of ``kind`` (each dtype, factor, mode and calibration model once); ``perf``
    needs the operator fits of
    :func:`moeflow.apps.bench.predict.with_op_costs` already."""
    table = dict(perf.meta.get("bench_costs", {}))
    meta = dict(perf.meta)
    out = PerfModel(
        name=perf.name,
        costs=perf.costs,
        bytes_per_element=perf.bytes_per_element,
        notes=perf.notes,
        meta=meta,
    )
    meta["bench_costs"] = table
    for s in settings:
        if not s.matrix:
            continue
        if s.sdpa == "math" and f"attention_math@{s.dtype}" not in table:
            table[f"attention_math@{s.dtype}"] = profile_attention_math(out, s.dtype).to_dict()
        if s.quant == "int8" and f"int8_dequant@{s.dtype}" not in table:
            table[f"int8_dequant@{s.dtype}"] = profile_int8_dequant(s.dtype).to_dict()
        for factor, name in factors(s):
            if unit_key(name, s.dtype, mode, kind) in table:
                continue
            alone = Setting(
                kernel=s.kernel,
                dtype=s.dtype,
                finetune=s.finetune if factor == "lora" else "full",
                zero3=s.zero3 if factor == "zero3" else False,
                quant=s.quant if factor == "int8" else "none",
                sdpa=s.sdpa if factor == "sdpa" else "default",
            )
            table.update(calibrate_unit(out, alone, mode, kind))
    return out


# -- prediction --------------------------------------------------------------------------
def _entry(perf: PerfModel, key: str) -> dict:
    table = perf.meta.get("bench_costs", {})
    if key not in table:
        raise ConfigError(
            "perf model",
            perf.name,
            f"a meta['bench_costs'] entry {key!r} (moeflow bench --simulate calibrates it)",
        )
    return table[key]


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def sdpa_math_rows(d: StepDissection, perf: PerfModel, dtype: str) -> dict:
    """{(phase, row): ms to add} for every math-back-end SDPA record: its two GEMMs are
    priced already, ``attention_math@<dtype>`` adds the work on its score matrix."""
    am = LinearCost.from_dict(_entry(perf, f"attention_math@{dtype}"))
    out: dict = {}
    for rec in d.inventory:
        if rec.name != "aten::scaled_dot_product_attention" or rec.phase != "forward":
            continue
        if any("flash" in n for n, _ in rec.gemms):
            continue
        (*bh, lq, _), (*_, lk, _) = (list(x) for x in rec.shapes[:2])
        key = (rec.phase, rec.row)
        out[key] = out.get(key, 0.0) + am(_numel(bh) * int(lq) * int(lk))
    return out


def int8_rows(d: StepDissection, perf: PerfModel, dtype: str, weights: list) -> dict:
    """{(phase, row): ms to add} so that every dequantization of a quantized weight (an
    ``aten::to`` of the transposed weight's shape, after the ``aten::t`` of the weight) is
    priced by ``int8_dequant@<dtype>`` instead of the copy class."""
    from moeflow.apps.bench.predict import op_class

    deq = LinearCost.from_dict(_entry(perf, f"int8_dequant@{dtype}"))
    copy = _cost(perf, op_class("aten::to"), dtype)
    py = LinearCost.from_dict(perf.meta["bench_costs"]["python_op"]).alpha
    shapes = {(k, n) for n, k in weights}
    es = ESIZE[dtype]
    out: dict = {}
    inv = d.inventory
    for i, rec in enumerate(inv):
        if rec.name != "aten::to" or rec.phase != "forward" or not rec.shapes:
            continue
        s0 = rec.shapes[0]
        if not isinstance(s0, (list, tuple)) or tuple(int(x) for x in s0) not in shapes:
            continue
        # torchao's path: t(weight) [N, K], reshape(x), to(weight) [K, N]; an activation's
        # ``to`` of the same shape has no transpose of the weight before it
        k, n_ = (int(x) for x in s0)
        if not any(
            r.name == "aten::t" and r.shapes and list(r.shapes[0]) == [n_, k]
            for r in inv[max(0, i - 3) : i]
        ):
            continue
        n = _numel(s0)
        before = copy(2 * es * n) + max(0.0, py - copy.alpha)
        key = (rec.phase, rec.row)
        out[key] = out.get(key, 0.0) + deq(n) - before
    return out


def predict_matrix_rows(
    d: StepDissection,
    perf: PerfModel,
    setting: Setting,
    units: dict,
    *,
    fixed: bool = True,
    kind: str = "demo",
) -> dict:
    """{(phase, row): predicted ms} of a matrix setting: :func:`predict_rows`, the repricing
    of SDPA math and int8 dequantization, and (``fixed``) each factor's unit cost."""
    dtype = setting.dtype
    rows = dict(predict_rows(d, perf, dtype))
    adds = []
    if setting.sdpa == "math":
        adds.append(sdpa_math_rows(d, perf, dtype))
    if setting.quant == "int8":
        adds.append(int8_rows(d, perf, dtype, units.get("int8_weights", [])))
    for add in adds:
        for k, v in add.items():
            rows[k] = rows.get(k, 0.0) + v
    if fixed:
        mode = "train" if any(p == "backward" for p, _ in rows) else "decode"
        for factor, name in factors(setting):
            e = _entry(perf, unit_key(name, dtype, mode, kind))
            key = ("forward", UNIT_ROW[factor])
            rows[key] = rows.get(key, 0.0) + e["alpha"] * units.get(factor, 0)
    return {k: max(0.0, v) for k, v in rows.items()}


def compare_matrix(
    d: StepDissection, perf: PerfModel, setting: Setting, units: dict, kind: str = "demo"
) -> dict:
    """:func:`moeflow.apps.bench.predict.compare` for a matrix setting: the same fields, with
    the prediction of :func:`predict_matrix_rows` and the unit costs it added."""
    pred = predict_matrix_rows(d, perf, setting, units, kind=kind)
    base = predict_rows(d, perf, setting.dtype)
    tl = simulate(step_graph(pred))
    rows = row_table(d, pred)
    total_m = d.unprofiled_ms
    mode = "train" if any(p == "backward" for p, _ in pred) else "decode"
    return {
        "perf_model": perf.name,
        "dtype": setting.dtype,
        "predicted_ms": tl.makespan,
        "predicted_ms_operators_only": simulate(step_graph(base)).makespan,
        "measured_ms": total_m,
        "ratio": tl.makespan / total_m if total_m > 0 else None,
        "error": abs(tl.makespan - total_m) / total_m if total_m > 0 else None,
        "rows": rows,
        "units": {k: v for k, v in units.items() if isinstance(v, int)},
        "unit_costs": {
            name: _entry(perf, unit_key(name, setting.dtype, mode, kind))
            for _, name in factors(setting)
        },
        "gemm_cost": _cost(perf, "gemm", setting.dtype).to_dict(),
        "op_costs": {
            c: _cost(perf, c, setting.dtype).to_dict() for c in ("elementwise", *OP_CLASSES)
        },
    }


__all__ = [
    "CAL_DIMS",
    "CAL_SHAPE",
    "factors",
    "cal_kind",
    "unit_key",
    "profile_attention_math",
    "profile_int8_dequant",
    "calibrate_unit",
    "with_matrix_costs",
    "sdpa_math_rows",
    "int8_rows",
    "predict_matrix_rows",
    "compare_matrix",
]
