"""Dissect one step: ``torch.profiler`` operators joined with module hooks.

The runtime-dissection method (top-down: end to end, per module with forward and backward
apart, per operator) on one process:

1. Forward pre/post hooks on every timed module
   (:func:`moeflow.apps.bench.workloads.timed_modules`) open and close a ``record_function``
   scope ``moeflow.bench::module::<row>::<name>``; the step and its phases (forward,
   backward, optimizer) have scopes of their own.
2. The profiler's events form a tree per thread. Every event's *self* time (its duration minus
   its children's) is charged to one (phase, row, operator): the phase of the enclosing phase
   scope, the row of the innermost module scope, the event's own name (``[python]`` for the
   self time of a scope: interpreter work between operators).
3. Backward operators run outside any module. Autograd stamps each forward operator and the
   backward node it creates with the same sequence number, so the node
   ``autograd::engine::evaluate_function: XBackward0`` takes the row of the forward op with
   its number (``AccumulateGrad`` nodes, which have none, take the row of the node before).
   Recomputed forwards (activation checkpointing) run inside their module scopes again, so
   their time is backward time of their own row.
4. Under ``torch.compile`` the fused kernels of an inductor graph are no aten operators: the
   inventory lists each graph call (``[compiled graph call]``) with the extern operators it
   runs (GEMMs, attention) as operators of their own.

Self times partition each step scope exactly, so the rows sum to the profiler's step time;
the step is also timed with ``perf_counter`` (with and without the profiler) as a check.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from moeflow.apps.bench.workloads import Workload, timed_modules

PREFIX = "moeflow.bench::"
STEP = PREFIX + "step"
PHASE = PREFIX + "phase::"
MODULE = PREFIX + "module::"
BACKWARD_NODE = "autograd::engine::evaluate_function: "
PYTHON = "[python]"
#: inventory entries that are not operators: a module call, a backward node
MODULE_CALL = "[module call]"
AUTOGRAD_NODE = "[autograd node]"
#: an inductor graph call (``torch.compile``): its fused kernels run inside this scope and
#: are no aten operators, so the inventory holds the call itself
COMPILED_GRAPH = "## Call CompiledFxGraph"
COMPILED_CALL = "[compiled graph call]"
PHASES = ("forward", "backward", "optimizer")
#: operators that are matrix products (their FLOPs are priced with the GEMM cost)
GEMM_OPS = (
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::_grouped_mm",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
)


@dataclass
class OpRecord:
    """One top-level aten operator of a step: where it ran and its input shapes."""

    phase: str
    row: str
    name: str
    self_us: float
    shapes: list
    gemms: list = field(default_factory=list)  # (name, shapes) of the GEMMs inside it
    dtypes: list = field(default_factory=list)  # the profiler's input dtypes ("float", ...)
    total_us: float = 0.0  # inclusive time (its children's too), for per-term comparisons
    calls: list = field(default_factory=list)  # the aten operators it calls (a copy or not)


@dataclass
class StepDissection:
    """Times in ms, averaged over the profiled steps."""

    step_ms: float  # profiler's step scope (its start-to-end interval), mean
    wall_ms: float  # perf_counter around the same steps, mean
    unprofiled_ms: float  # perf_counter, no profiler and no hooks, median
    rows: dict  # (phase, row) -> ms
    ops: dict  # (phase, row, op) -> [ms, calls per step]
    steps: int
    step_ms_each: list
    inventory: list  # OpRecord of the last profiled step
    trace: dict | None = None  # the Chrome trace of the profiled steps

    def total(self) -> float:
        return sum(self.rows.values())

    def row_total(self, row: str) -> float:
        return sum(v for (p, r), v in self.rows.items() if r == row)

    def phase_total(self, phase: str) -> float:
        return sum(v for (p, r), v in self.rows.items() if p == phase)


class ModuleScopes:
    """Forward hooks that wrap each timed module's forward in a profiler scope."""

    def __init__(self, model: torch.nn.Module):
        self.handles = []
        self.stack: list = []
        for name, mod, row in timed_modules(model):
            label = f"{MODULE}{row}::{name}"
            self.handles.append(
                mod.register_forward_pre_hook(lambda m, a, label=label: self._enter(label))
            )
            self.handles.append(
                mod.register_forward_hook(lambda m, a, o: self._exit(), always_call=True)
            )

    def _enter(self, label: str) -> None:
        rf = record_function(label)
        rf.__enter__()
        self.stack.append(rf)

    def _exit(self) -> None:
        if self.stack:
            self.stack.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()


def run_step(w: Workload) -> None:
    """One training or decode step, its phases in profiler scopes."""
    with record_function(STEP):
        if w.mode == "train":
            with record_function(PHASE + "forward"):
                loss = w.loss(w.logits(w.ids_BL))
            with record_function(PHASE + "backward"):
                loss.backward()
            with record_function(PHASE + "optimizer"):
                w.opt.step()
                w.opt.zero_grad(set_to_none=True)
        else:
            with torch.no_grad(), record_function(PHASE + "forward"):
                w.decode_forward()


def _timed_step(w: Workload) -> float:
    w.before_step()
    t0 = time.perf_counter()
    run_step(w)
    return (time.perf_counter() - t0) * 1e3


def _is_op(name: str) -> bool:
    return not name.startswith(PREFIX) and not name.startswith(BACKWARD_NODE)


def attribute(events) -> tuple[list[dict], list[dict], list[list[OpRecord]]]:
    """Per step scope: {(phase, row): us}, {(phase, row, op): [us, calls]} and the op records.

    ``events`` is ``prof.events()``; see the module docstring for the rules.
    """
    roots = sorted((e for e in events if e.name == STEP), key=lambda e: e.time_range.start)
    fwd_row: dict[int, str] = {}
    rows_out, ops_out, inv_out = [], [], []
    for root in roots:
        rows: dict = {}
        ops: dict = {}
        inv: list[OpRecord] = []
        last_bwd = ["other"]
        # iterative DFS in time order: (event, phase, row, under_backward_node, top_op,
        # under_a_gemm)
        stack = [(root, "forward", "other", False, None, False)]
        while stack:
            e, phase, row, in_node, top, in_gemm = stack.pop()
            name = e.name
            if name.startswith(PHASE):
                phase = name[len(PHASE) :]
            elif name.startswith(MODULE):
                row = name[len(MODULE) :].split("::", 1)[0]
                inv.append(OpRecord(phase, row, MODULE_CALL, 0.0, []))
            elif name.startswith(BACKWARD_NODE):
                row = fwd_row.get(e.sequence_nr, last_bwd[0]) if e.sequence_nr >= 0 else last_bwd[0]
                last_bwd[0] = row
                in_node = True
                inv.append(OpRecord(phase, row, AUTOGRAD_NODE, 0.0, []))
            elif not in_node and e.sequence_nr >= 0 and "Backward" not in name:
                fwd_row.setdefault(e.sequence_nr, row)
            if name.startswith(COMPILED_GRAPH):
                inv.append(OpRecord(phase, row, COMPILED_CALL, 0.0, []))
            op = name if _is_op(name) else PYTHON
            us = float(e.self_cpu_time_total)
            rows[(phase, row)] = rows.get((phase, row), 0.0) + us
            rec = ops.setdefault((phase, row, op), [0.0, 0])
            rec[0] += us
            rec[1] += 1
            if name.startswith(("aten::", "c10d::")) and top is None:
                top = OpRecord(
                    phase,
                    row,
                    name,
                    us,
                    list(e.input_shapes or []),
                    dtypes=list(getattr(e, "input_dtypes", None) or []),
                    total_us=float(e.cpu_time_total),
                    calls=sorted({c.name for c in e.cpu_children if c.name.startswith("aten::")}),
                )
                inv.append(top)
            if top is not None and name in GEMM_OPS and not in_gemm:
                # a GEMM inside a GEMM (CPU grouped_mm runs mm per group) is counted once
                top.gemms.append((name, list(e.input_shapes or [])))
                in_gemm = True
            children = sorted(e.cpu_children, key=lambda c: c.time_range.start, reverse=True)
            for c in children:
                stack.append((c, phase, row, in_node, top, in_gemm))
        rows_out.append(rows)
        ops_out.append(ops)
        inv_out.append(inv)
    return rows_out, ops_out, inv_out


def step_scope_ms(events) -> list[float]:
    """The duration (ms) of every step scope, from its start and end timestamps: the
    profiler's interval clock, independent of the per-event self times that
    :func:`attribute` distributes over rows and operators."""
    roots = sorted((e for e in events if e.name == STEP), key=lambda e: e.time_range.start)
    return [(e.time_range.end - e.time_range.start) / 1e3 for e in roots]


def dissect(
    w: Workload,
    *,
    warmup: int = 2,
    steps: int = 3,
    unprofiled: int = 3,
    on_step=None,
    keep_trace: bool = False,
) -> StepDissection:
    """Warm up, time ``unprofiled`` plain steps, then profile ``steps`` steps and attribute.

    ``on_step()`` is called after every step (a progress bar). ``keep_trace`` keeps the
    profiler's Chrome trace of the profiled steps (``StepDissection.trace``).
    """
    tick = on_step or (lambda: None)
    for _ in range(warmup):
        _timed_step(w)
        tick()
    plain = []
    for _ in range(unprofiled):
        plain.append(_timed_step(w))
        tick()
    scopes = ModuleScopes(w.model)
    walls = []
    try:
        # the first profiled step pays the profiler's start-up: it is run and dropped
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for i in range(steps + 1):
                t = _timed_step(w)
                if i:
                    walls.append(t)
                tick()
        # shapes cost time to record, so the inventory comes from one more step of its own
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as shaped:
            _timed_step(w)
    finally:
        scopes.remove()
    inventory = attribute(shaped.events())[2]
    rows_s, ops_s, _ = attribute(prof.events())
    rows_s, ops_s = rows_s[1:], ops_s[1:]
    n = len(rows_s)
    rows: dict = {}
    ops: dict = {}
    for r in rows_s:
        for k, v in r.items():
            rows[k] = rows.get(k, 0.0) + v / 1e3 / n
    for o in ops_s:
        for k, (us, calls) in o.items():
            rec = ops.setdefault(k, [0.0, 0.0])
            rec[0] += us / 1e3 / n
            rec[1] += calls / n
    step_each = step_scope_ms(prof.events())[1:]
    trace = None
    if keep_trace:
        import json
        import os
        import tempfile

        fd, tmp = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        try:
            prof.export_chrome_trace(tmp)
            with open(tmp) as f:
                trace = json.load(f)
        finally:
            os.unlink(tmp)
    return StepDissection(
        step_ms=statistics.fmean(step_each) if step_each else 0.0,
        wall_ms=statistics.fmean(walls),
        unprofiled_ms=statistics.median(plain) if plain else float("nan"),
        rows=rows,
        ops=ops,
        steps=n,
        step_ms_each=step_each,
        inventory=inventory[-1] if inventory else [],
        trace=trace,
    )
