"""``moeflow profile``: time GEMMs, collectives and the codec; fit one PerfModel
(:mod:`moeflow.apps.profile`); with ``--op-costs`` also the per-operator costs that
``moeflow bench --simulate`` reads (:func:`moeflow.apps.bench.predict.with_op_costs`)."""

from moeflow.apps import profile as _app

add_arguments = _app.add_profile_arguments


def _op_costs(model, args):
    import torch.distributed as dist

    from moeflow.apps.bench.predict import with_op_costs

    return with_op_costs(
        model,
        tuple(model.meta.get("compute_dtypes", ("float32",))),
        nproc=1 if dist.is_initialized() else args.nproc,
        compiled=True,
    )


def run(args) -> int:
    return _app.run_profile(args, extend=_op_costs if getattr(args, "op_costs", False) else None)


# the CLI boundary looks up ``run_profile`` before ``run``
run_profile = run

__all__ = ["add_arguments", "run"]
