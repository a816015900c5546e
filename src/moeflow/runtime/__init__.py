"""Deprecated: ``moeflow.runtime`` split into :mod:`moeflow.parallel` (the expert-parallel
engine, ``parallelize``), :mod:`moeflow.serving` and :mod:`moeflow.geo`. The names it exported
resolve from their new homes, with a :class:`DeprecationWarning`, for one release."""

from moeflow._moved import moved_names

__getattr__ = moved_names(
    __name__,
    dict.fromkeys(
        (
            "ExpertParallel",
            "PipelinedExperts",
            "resolve_degrees",
            "run_wavefront",
            "parallelize",
            "sync_gradients",
            "export_pretrained",
            "load_balancing_loss",
            "clip_grad_norm_",
        ),
        "moeflow.parallel",
    )
    | {"load_checkpoint": "moeflow.parallel.parallelize:load_pretrained_weights"},
)
