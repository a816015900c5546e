"""Deprecated: step dissection moved to :mod:`moeflow.apps.bench`; its names resolve from
there, with a :class:`DeprecationWarning`, for one release."""

from moeflow._moved import moved_names

__getattr__ = moved_names(
    __name__,
    dict.fromkeys(
        (
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
        ),
        "moeflow.apps.bench",
    ),
)
