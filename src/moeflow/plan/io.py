"""Reading plans and cost models from JSON files, checked: a missing, oversized, malformed or
out-of-range file raises :class:`moeflow.errors.InputError` naming the flag and the file.
Pure Python, like the rest of :mod:`moeflow.plan`."""

from __future__ import annotations

from moeflow.errors import InputError
from moeflow.validate import positive_float, positive_int, read_json_file

#: largest pipeline degree searched or simulated. The simulated task graph has ~4 tasks per
#: chunk per pass, so time and memory grow with layers x r (r = 10,000 took 20 s and 1.7 GB);
#: at the caps (MAX_LAYERS layers x r = MAX_DEGREE) a simulation takes ~4 s and 0.2 GB on one
#: CPU core. The planner's default search bound is 16.
MAX_DEGREE = 64
MAX_LAYERS = 512
MAX_NODES = 65536
MAX_TOKENS = 2**30
#: ``--perf`` / ``--plan`` JSON files larger than this are refused before reading
MAX_JSON_BYTES = 64 * 2**20


def _parse(path, flag: str, what: str, build):
    d = read_json_file(path, flag, MAX_JSON_BYTES)
    try:
        return build(d)
    except InputError as e:
        raise InputError(f"{flag} {str(path)!r}: {e}") from None
    except KeyError as e:
        raise InputError(
            f"{flag} {str(path)!r}: not a valid {what}: missing field {e.args[0]!r}"
        ) from None
    except (ValueError, TypeError, AttributeError, OverflowError) as e:
        raise InputError(
            f"{flag} {str(path)!r}: not a valid {what}: {' '.join(str(e).split())}"
        ) from None


def load_perf_file(path, flag: str = "--perf"):
    """A :class:`moeflow.perf.PerfModel` from ``path``, with every primitive the planner
    uses (``gemm``, ``a2a``, ``ag``, ``rs``, ``ar``); InputError naming the file otherwise."""
    from moeflow.perf import PerfModel
    from moeflow.perf.cost import PLANNER_PRIMITIVES

    def build(d):
        perf = PerfModel.from_dict(d)
        missing = [k for k in PLANNER_PRIMITIVES if k not in perf.costs]
        if missing:
            raise ValueError(f"no cost for {missing} (needs {list(PLANNER_PRIMITIVES)})")
        positive_int("bytes_per_element", perf.bytes_per_element)
        return perf

    return _parse(path, flag, "moeflow perf model", build)


def load_plan_file(path, flag: str = "--plan"):
    """A :class:`moeflow.plan.Plan` from ``path`` with 1..MAX_LAYERS layers of degrees in
    [1, MAX_DEGREE]; InputError naming the file otherwise."""
    from moeflow.plan import Plan

    def build(d):
        plan = Plan.from_dict(d)
        if not 1 <= len(plan.layers) <= MAX_LAYERS:
            raise ValueError(f"{len(plan.layers)} layers (allowed: 1..{MAX_LAYERS})")
        for lp in plan.layers:
            positive_int(f"layers[{lp.index}].r_fwd", lp.r_fwd, maximum=MAX_DEGREE)
            positive_int(f"layers[{lp.index}].r_bwd", lp.r_bwd, maximum=MAX_DEGREE)
            for name in ("gar_bytes", "t_fwd_ms", "t_bwd_ms"):
                positive_float(f"layers[{lp.index}].{name}", getattr(lp, name), allow_zero=True)
        return plan

    return _parse(path, flag, "moeflow plan", build)
