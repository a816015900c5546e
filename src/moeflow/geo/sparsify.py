"""AdaTopK's codec: top-k sparsification with error feedback, for one direction of one link.

FusionLLM (Tang et al., "FusionLLM: A Decentralized LLM Training System on Geo-distributed GPUs
with Adaptive Compression", 2024) compresses only the activations and gradients that cross the
slowest links of a pipeline, with top-k sparsification whose ratio is chosen per link.
What the sender drops is not lost: error feedback (Seide et al., "1-Bit Stochastic Gradient
Descent", Interspeech 2014; Stich et al., "Sparsified SGD with Memory", NeurIPS 2018, Alg. 1)
keeps it in a residual that is added to the next tensor sent on the same link, so over many
steps everything that was put in is eventually delivered:

    acc_t      = x_t + r_{t-1}
    sent_t     = top-k of acc_t by magnitude (k = max(1, ceil(density * numel)))
    r_t        = acc_t - sent_t
    sum_t decompress(sent_t) + r_T = sum_t x_t

The density is chosen by the planner from the link's bandwidth
(``moeflow.plan.geo.adatopk_density``); this module is only the codec and its state. One
``TopKFeedback`` serves one tensor stream (one cut tensor, one direction): its residual has
that tensor's shape. The residual is kept in float32 for half-precision tensors, so the
rounding of the values sent is fed back too.
"""

from __future__ import annotations

import math
import numbers

import torch

from moeflow.errors import ConfigError, InputError


def _check_density(density) -> float:
    ok = (
        isinstance(density, numbers.Real)
        and not isinstance(density, bool)
        and math.isfinite(density)
        and 0 < density <= 1
    )
    if not ok:
        raise ConfigError("density", density, "a number in (0, 1]")
    return float(density)


def topk_count(density: float, numel: int) -> int:
    """``k = max(1, ceil(density * numel))``, the product rounded to 1e-6 first so that
    ``0.1 * 30`` gives 3 (binary floating point makes it 3.0000000000000004)."""
    return max(1, math.ceil(round(_check_density(density) * numel, 6)))


class TopKFeedback:
    """Top-k sparsifier with error feedback for one direction of one link.

    ``values, indices = codec.compress(x)`` sends the ``k`` largest-magnitude entries of
    ``x + residual`` (flat int64 indices, ascending); the receiver rebuilds the dense tensor
    with :meth:`decompress`. ``density`` may be changed between calls (AdaTopK adapts it to the
    link); the residual carries over.
    """

    def __init__(self, density: float, *, feedback: bool = True):
        self._density = _check_density(density)
        #: keep what was not sent and add it to the next tensor (False: plain top-k)
        self.feedback = bool(feedback)
        self.residual: torch.Tensor | None = None
        self._dtype: torch.dtype | None = None  # dtype of the tensors this stream carries

    @property
    def density(self) -> float:
        return self._density

    @density.setter
    def density(self, value: float) -> None:
        self._density = _check_density(value)

    def k(self, numel: int) -> int:
        """Entries sent for a tensor of ``numel`` elements at the current density."""
        return topk_count(self._density, numel)

    def compress(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` of the top-k of ``x + residual``; the residual keeps the rest.

        ``values`` has ``x``'s dtype, ``indices`` are int64 positions in the flattened tensor.
        ``x`` is read, never modified, and not differentiated through.
        """
        if not isinstance(x, torch.Tensor):
            raise InputError(f"compress expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise InputError(
                f"compress: dtype {x.dtype} is not allowed: a floating dtype "
                "(float32, bfloat16, float16, float64)"
            )
        if x.numel() == 0:
            raise InputError(f"compress: tensor of shape {tuple(x.shape)} has no elements")
        acc_dtype = torch.promote_types(x.dtype, torch.float32)
        if self.residual is not None:
            if tuple(x.shape) != tuple(self.residual.shape):
                raise InputError(
                    f"compress: shape {tuple(x.shape)} differs from this stream's "
                    f"{tuple(self.residual.shape)}: one TopKFeedback serves one tensor stream"
                )
            if x.dtype != self._dtype:
                raise InputError(
                    f"compress: dtype {x.dtype} differs from this stream's {self._dtype}"
                )
        with torch.no_grad():
            acc = x.detach().to(acc_dtype)
            if self.residual is not None:
                acc = (acc + self.residual.to(acc.device)).contiguous()
            else:  # a copy in row-major order (a cut tensor may be a transposed view)
                acc = acc.clone(memory_format=torch.contiguous_format)
            flat = acc.view(-1)
            k = self.k(flat.numel())
            if k == flat.numel():
                indices = torch.arange(k, device=flat.device)
            else:
                indices = flat.abs().topk(k, sorted=False).indices.sort().values
            values = flat[indices].to(x.dtype)
            # what was sent leaves the residual; for float32 this zeroes those entries exactly
            flat[indices] -= values.to(acc_dtype)
        self.residual = acc if self.feedback else None
        self._dtype = x.dtype
        return values, indices

    @staticmethod
    def decompress(
        values: torch.Tensor, indices: torch.Tensor, shape, dtype: torch.dtype
    ) -> torch.Tensor:
        """The dense tensor of ``shape`` and ``dtype``: ``values`` at ``indices``, zeros
        elsewhere."""
        shape = tuple(int(s) for s in shape)
        numel = math.prod(shape)
        if not isinstance(values, torch.Tensor) or not isinstance(indices, torch.Tensor):
            raise InputError("decompress expects tensors for values and indices")
        if values.dim() != 1 or indices.dim() != 1 or values.numel() != indices.numel():
            raise InputError(
                f"decompress: values {tuple(values.shape)} and indices {tuple(indices.shape)} "
                "must be 1-D of the same length"
            )
        if indices.dtype != torch.int64:
            raise InputError(f"decompress: indices dtype {indices.dtype} is not int64")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= numel):
            raise InputError(
                f"decompress: indices outside [0, {numel}) for shape {shape} "
                f"(min {int(indices.min())}, max {int(indices.max())})"
            )
        out = torch.zeros(numel, dtype=dtype, device=values.device)
        out[indices] = values.to(dtype)
        return out.view(shape)

    def reset(self) -> None:
        """Drop the residual (a new stream, or the link turned exact)."""
        self.residual = None
        self._dtype = None

    def state_dict(self) -> dict:
        """``{"density", "residual", "dtype"}``: everything needed to continue the stream."""
        return {
            "density": self._density,
            "residual": None if self.residual is None else self.residual.clone(),
            "dtype": None if self._dtype is None else str(self._dtype).removeprefix("torch."),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not isinstance(state, dict) or set(state) != {"density", "residual", "dtype"}:
            keys = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise InputError(
                f"TopKFeedback state must have keys density, residual, dtype; got {keys}"
            )
        residual, dtype_name = state["residual"], state["dtype"]
        if (residual is None) != (dtype_name is None):
            raise InputError("TopKFeedback state: residual and dtype must both be set or None")
        if residual is not None:
            if not isinstance(residual, torch.Tensor) or not residual.is_floating_point():
                raise InputError("TopKFeedback state: residual must be a floating tensor")
            dtype = getattr(torch, dtype_name, None)
            if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
                raise InputError(f"TopKFeedback state: dtype {dtype_name!r} is not a float dtype")
        density = _check_density(state["density"])
        self._density = density
        self.residual = None if residual is None else residual.clone()
        self._dtype = None if residual is None else dtype
