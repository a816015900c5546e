"""Typed errors. Every error names the offending value and says what is allowed."""

from __future__ import annotations


class MoeflowError(Exception):
    """Base class of every error moeflow raises on purpose.

    Every subclass survives ``pickle`` (errors travel between ranks): a subclass whose
    constructor does not take ``*args`` as given to ``Exception`` overrides
    :meth:`_reduce_args` to return its constructor's arguments.
    """

    def _reduce_args(self) -> tuple:
        return self.args

    def __reduce__(self):
        return type(self), self._reduce_args(), self.__dict__ or None


class ConfigError(MoeflowError, ValueError):
    """A configuration field holds a value that is not allowed."""

    def __init__(self, field: str, value, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{field}={value!r} is not allowed: {allowed}")

    def _reduce_args(self) -> tuple:
        return self.field, self.value, self.allowed


class InputError(MoeflowError, ValueError):
    """A tensor passed in has the wrong shape, dtype or content."""


class RoutingError(MoeflowError, ValueError):
    """Router scores are not finite (NaN or Inf)."""


class UnsupportedModelError(MoeflowError, ValueError):
    """A transformers module class that moeflow cannot convert."""


class CorruptDataError(MoeflowError, ValueError):
    """Bytes read back (compressed data, a checkpoint or model file) are corrupted, truncated,
    inconsistent, or not in the format expected."""


class DistributedConfigError(MoeflowError, ValueError):
    """A parallel layout that cannot work (degrees that do not divide, groups too large)."""


class CommTimeoutError(MoeflowError, RuntimeError):
    """A collective did not finish in time: a peer rank died or stalls."""


class PlanError(MoeflowError, ValueError):
    """A planner input that has no feasible plan."""
