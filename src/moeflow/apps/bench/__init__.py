"""Step dissection: where an MoE training or decode step goes, and does the simulator agree.

``moeflow bench train|decode`` (:mod:`moeflow.cli.bench`) times one step top-down, the way the
runtime-dissection studies of LLM training and serving do: end to end, per module (attention,
MoE router / experts / rest, norms, embeddings, LM head; forward and backward apart) and per
operator, from ``torch.profiler`` joined with module hooks (:mod:`moeflow.apps.bench.dissect`),
over several settings (expert kernel, dtype, recomputation, ``torch.compile``, expert
parallelism: :mod:`moeflow.apps.bench.ep`; LoRA fine-tuning, ZeRO-3 through FSDP2,
weight-only int8 and the SDPA back-ends: :mod:`moeflow.apps.bench.matrix`). FLOPs and MFU
come from analytic formulas checked against ``FlopCounterMode`` (:mod:`moeflow.apps.bench.flops`);
:mod:`moeflow.apps.bench.predict` predicts the same step with :mod:`moeflow.sim` from a
PerfModel profiled on the machine (the matrix settings by
:mod:`moeflow.apps.bench.predict_matrix`).

    from moeflow.apps.bench import BenchJob, Setting, bench
    report = bench(BenchJob(mode="train", settings=[Setting(kernel="bmm")]))
"""

from moeflow.apps.bench.dissect import StepDissection, dissect
from moeflow.apps.bench.flops import (
    active_params,
    attention_flops,
    count_flops,
    embedding_flops,
    mfu,
    moe_flops,
    register_formulas,
    step_flops,
)
from moeflow.apps.bench.report import FORMAT, format_table, validate_report, write_json, write_png
from moeflow.apps.bench.run import BenchJob, bench, settings_grid
from moeflow.apps.bench.workloads import CATEGORIES, Setting, Shape, Workload, build_workload

__all__ = [
    "StepDissection",
    "dissect",
    "active_params",
    "attention_flops",
    "count_flops",
    "embedding_flops",
    "mfu",
    "moe_flops",
    "register_formulas",
    "step_flops",
    "FORMAT",
    "format_table",
    "validate_report",
    "write_json",
    "write_png",
    "BenchJob",
    "bench",
    "settings_grid",
    "CATEGORIES",
    "Setting",
    "Shape",
    "Workload",
    "build_workload",
]
