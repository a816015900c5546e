"""Grouped expert FFN: one interface, three implementations.

Shape legend: N rows (token-expert assignments, grouped by expert in expert order),
D hidden, F FFN width, X = 2F for SwiGLU (gate rows then up rows) or F for GELU, E experts.

* ``grouped_mm`` - ``torch._grouped_mm`` over row offsets; one call per GEMM for all experts.
* ``bmm``        - pad every expert to the largest count, then one ``torch.bmm``.
* ``loop``       - a plain per-expert ``F.linear`` loop through autograd; the test reference.

``grouped_mm`` and ``bmm`` run inside :class:`ExpertFFNFunction`, a hand-written autograd
function: the backward reuses the same grouped GEMM for data and weight gradients and a fused
SwiGLU backward that writes both halves of dh in place (no concatenation).

CPU notes (measured on AVX2-only EPYC, see benchmarks/results/layer_cpu_*):
* bf16/fp16 GEMMs are ~40x slower than fp32 on CPUs without AVX512-BF16/AMX, so there the
  GEMMs run in fp32 (inputs upcast once, outputs rounded back): same result dtype, more
  accurate, and far faster. ``MOEFLOW_CPU_LOWP_GEMM=native|fp32`` overrides the detection.
* ``torch._grouped_mm`` on CPU needs 16-byte aligned strides; operands that are not (odd
  widths in bf16, F-slices of weights) go through a per-expert ``mm`` loop instead.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch
import torch.nn.functional as F

from moeflow.errors import InputError

IMPLS = ("auto", "grouped_mm", "bmm", "loop")
ACTIVATIONS = ("swiglu", "gelu")


def _has_grouped_mm() -> bool:
    return hasattr(torch, "_grouped_mm")


@functools.lru_cache(maxsize=1)
def _cpu_has_fast_lowp() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 or AMX)."""
    mode = os.environ.get("MOEFLOW_CPU_LOWP_GEMM", "").strip().lower()
    if mode in ("native", "fp32"):
        return mode == "native"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the expert GEMMs run in for inputs like ``x`` (fp32 for bf16/fp16 on CPUs
    without native low-precision dot products; ``x.dtype`` otherwise)."""
    if (
        x.device.type == "cpu"
        and x.dtype in (torch.bfloat16, torch.float16)
        and not _cpu_has_fast_lowp()
    ):
        return torch.float32
    return x.dtype


class _UpcastCache:
    """fp32 copies of low-precision weights, reused while the weight is unchanged.

    Converting a weight costs a full pass plus, for a fresh allocation, page faults that cost
    ~8x the copy itself on Linux (measured: 64 ms vs 7 ms for 16.7M bf16 elements). An entry
    belongs to one tensor object (weak reference, so freed tensors never match) and remembers
    its storage pointer, layout and version counter: an unchanged weight (inference, or the
    forward and backward of one step) reuses the copy; after an in-place update (optimizer step)
    the copy is refreshed into the same buffer. Autograd's version check on the saved
    low-precision weight still guards forward/backward consistency.
    """

    def __init__(self, max_entries: int = 32):
        self.max_entries = max_entries
        self.entries: dict = {}

    def get(self, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if w.dtype == dtype:
            return w
        sig = (w.data_ptr(), w.dtype, dtype, tuple(w.shape), tuple(w.stride()), w.device)
        entry = self.entries.pop(id(w), None)
        buf = None
        if entry is not None and entry[0]() is w:
            _, old_sig, version, buf = entry
            if old_sig == sig and version == w._version:
                self.entries[id(w)] = entry  # most recently used last
                return buf
            if buf.shape != w.shape:
                buf = None
        with torch.no_grad():
            if buf is not None:
                buf.copy_(w)
            else:
                buf = w.to(dtype, memory_format=torch.contiguous_format)
        self.entries[id(w)] = (weakref.ref(w), sig, w._version, buf)
        while len(self.entries) > self.max_entries:
            self.entries.pop(next(iter(self.entries)))
        return buf

    def clear(self) -> None:
        self.entries.clear()


_UPCAST = _UpcastCache()


def clear_weight_cache() -> None:
    """Drop the cached fp32 copies of low-precision expert weights (frees their memory)."""
    _UPCAST.clear()


def resolve_impl(impl: str, x: torch.Tensor) -> str:
    """Pick a concrete implementation for ``impl='auto'``.

    ``torch._grouped_mm`` needs bf16 on CUDA (and sm90+ for the fast path); on CPU it takes
    fp32 and bf16. Anything else falls back to padded bmm, which works everywhere.
    """
    if impl not in IMPLS:
        raise InputError(f"kernel impl={impl!r} is not allowed: one of {IMPLS}")
    if impl != "auto":
        return impl
    if not _has_grouped_mm():
        return "bmm"
    if x.device.type == "cpu":
        return "grouped_mm" if x.dtype in (torch.float32, torch.bfloat16) else "bmm"
    if x.device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(x.device)
        return "grouped_mm" if (x.dtype == torch.bfloat16 and major >= 9) else "bmm"
    return "bmm"


# --------------------------------------------------------------------------- grouped GEMMs
def _offsets(counts_E: torch.Tensor) -> torch.Tensor:
    return torch.cumsum(counts_E, 0).to(torch.int32)


def _pad_index(counts_E: torch.Tensor, n_rows: int):
    """Row -> (expert, slot) map used to scatter rows into a padded (E, C, .) buffer."""
    e_N = torch.repeat_interleave(
        torch.arange(counts_E.numel(), device=counts_E.device), counts_E, output_size=n_rows
    )
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_N = torch.arange(n_rows, device=counts_E.device) - starts_E[e_N]
    return e_N, slot_N


def _aligned16(t: torch.Tensor) -> bool:
    """``torch._grouped_mm`` on CPU wants 16-byte aligned base and strides."""
    if t.data_ptr() % 16:
        return False
    size = t.element_size()
    return all((st * size) % 16 == 0 for st, n in zip(t.stride(), t.shape) if n > 1 and st != 1)


class _Groups:
    """Precomputed grouping of N rows by expert, shared by all GEMMs of one call."""

    def __init__(self, counts_E: torch.Tensor, n_rows: int, impl: str):
        self.impl = impl
        self.counts_E = counts_E
        self.n_rows = n_rows
        self.num_experts = counts_E.numel()
        self._bounds = None
        if impl == "grouped_mm":
            self.offs = _offsets(counts_E)
        else:
            self.cap = int(counts_E.max()) if self.num_experts and n_rows else 0
            self.e_N, self.slot_N = _pad_index(counts_E, n_rows)

    def bounds(self):
        """(expert, start, end) of every non-empty expert (one host sync, cached)."""
        if self._bounds is None:
            ends = torch.cumsum(self.counts_E, 0).tolist()
            starts = [0] + ends[:-1]
            self._bounds = [(e, s, t) for e, (s, t) in enumerate(zip(starts, ends)) if t > s]
        return self._bounds

    def gmm(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Grouped ``a[rows_e] @ b[e]`` (2-D a, 3-D b) with an mm-loop fallback."""
        if a.device.type != "cpu" or (_aligned16(a) and _aligned16(b)):
            return torch._grouped_mm(a, b, offs=self.offs)
        out = a.new_zeros(a.shape[0], b.shape[2])
        for e, s, t in self.bounds():
            torch.mm(a[s:t], b[e], out=out[s:t])
        return out

    def gmm_wgrad(self, g_ON: torch.Tensor, a_NI: torch.Tensor) -> torch.Tensor:
        """Grouped ``g_ON[:, rows_e] @ a_NI[rows_e]`` -> (E, O, I)."""
        if g_ON.device.type != "cpu" or (_aligned16(g_ON) and _aligned16(a_NI)):
            return torch._grouped_mm(g_ON, a_NI, offs=self.offs)
        out = a_NI.new_zeros(self.num_experts, g_ON.shape[0], a_NI.shape[1])
        for e, s, t in self.bounds():
            torch.mm(g_ON[:, s:t], a_NI[s:t], out=out[e])
        return out

    def pad(self, a_NI: torch.Tensor) -> torch.Tensor:
        out = a_NI.new_zeros(self.num_experts, self.cap, a_NI.shape[1])
        out[self.e_N, self.slot_N] = a_NI
        return out

    def unpad(self, a_ECO: torch.Tensor) -> torch.Tensor:
        return a_ECO[self.e_N, self.slot_N]

    def linear(self, a_NI: torch.Tensor, w_EOI: torch.Tensor) -> torch.Tensor:
        """Per expert e: rows_e @ w_EOI[e].T -> (N, O)."""
        if self.n_rows == 0:
            return a_NI.new_zeros(0, w_EOI.shape[1])
        if self.impl == "grouped_mm":
            return self.gmm(a_NI, w_EOI.transpose(-2, -1))
        return self.unpad(torch.bmm(self.pad(a_NI), w_EOI.transpose(-2, -1)))

    def linear_t(self, a_NO: torch.Tensor, w_EOI: torch.Tensor) -> torch.Tensor:
        """Per expert e: rows_e @ w_EOI[e] -> (N, I) (the data gradient of :meth:`linear`)."""
        if self.n_rows == 0:
            return a_NO.new_zeros(0, w_EOI.shape[2])
        if self.impl == "grouped_mm":
            return self.gmm(a_NO, w_EOI)
        return self.unpad(torch.bmm(self.pad(a_NO), w_EOI))

    def wgrad(self, g_NO: torch.Tensor, a_NI: torch.Tensor) -> torch.Tensor:
        """Per expert e: g_e.T @ a_e -> (E, O, I) (the weight gradient of :meth:`linear`)."""
        if self.n_rows == 0:
            return g_NO.new_zeros(self.num_experts, g_NO.shape[1], a_NI.shape[1])
        if self.impl == "grouped_mm":
            return self.gmm_wgrad(g_NO.t(), a_NI)
        return torch.bmm(self.pad(g_NO).transpose(1, 2), self.pad(a_NI))


# --------------------------------------------------------------------------- activations
def _act_forward(h_NX: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h_NX.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h_NX, approximate="tanh")


def _act_forward_(h_NX: torch.Tensor, activation: str) -> torch.Tensor:
    """In-place :func:`_act_forward`: the result is a view into ``h_NX``'s storage."""
    if activation == "swiglu":
        gate, up = h_NX.chunk(2, dim=-1)
        return F.silu(gate, inplace=True).mul_(up)
    return torch.ops.aten.gelu_(h_NX, approximate="tanh")


def _act_backward(
    da_NF: torch.Tensor,
    h_NX: torch.Tensor,
    activation: str,
    silu_gate_NF: torch.Tensor | None = None,
) -> torch.Tensor:
    """d loss / d h from d loss / d a.

    SwiGLU ``a = silu(g) * u``: ``du = da * silu(g)``, ``dg = silu'(g) * (da * u)``; both
    halves are written straight into one (N, 2F) buffer (no concatenation pass), and
    ``silu_gate_NF`` is reused when the caller already has it.
    """
    if activation == "swiglu":
        gate, up = h_NX.chunk(2, dim=-1)
        dh_NX = torch.empty_like(h_NX)
        d_gate, d_up = dh_NX.chunk(2, dim=-1)
        s = F.silu(gate) if silu_gate_NF is None else silu_gate_NF
        torch.mul(da_NF, s, out=d_up)
        torch.ops.aten.silu_backward.grad_input(da_NF * up, gate, grad_input=d_gate)
        return dh_NX
    return torch.ops.aten.gelu_backward(da_NF, h_NX, approximate="tanh")


class ExpertFFNFunction(torch.autograd.Function):
    """y_ND = act(x_ND @ w_in[e].T) @ w_out[e].T for the rows of each expert e.

    GEMMs run in :func:`compute_dtype` (fp32 for bf16 on CPUs without native bf16); the
    output and the gradients come back in the dtypes of the inputs.
    """

    @staticmethod
    def forward(ctx, x_ND, w_in_EXD, w_out_EDF, counts_E, activation, impl):
        cd = compute_dtype(x_ND)
        ctx.cd = cd
        ctx.dtypes = (x_ND.dtype, w_in_EXD.dtype, w_out_EDF.dtype)
        x_c = x_ND.to(cd)
        groups = _Groups(counts_E, x_ND.shape[0], impl)
        h_NX = groups.linear(x_c, _UPCAST.get(w_in_EXD, cd))
        s_NF = None
        if not any(ctx.needs_input_grad[:3]):
            # inference: h is not kept, so the activation overwrites it (no N x F alloc)
            a_NF = _act_forward_(h_NX, activation)
        elif activation == "swiglu":
            # keep silu(gate) and a (as autograd would): recomputing them costs ~3% of a
            # CPU fwd+bwd, for N x 2F of memory
            gate, up = h_NX.chunk(2, dim=-1)
            s_NF = F.silu(gate)
            a_NF = s_NF * up
        else:
            a_NF = _act_forward(h_NX, activation)
        y_ND = groups.linear(a_NF, _UPCAST.get(w_out_EDF, cd))
        ctx.groups = groups
        ctx.activation = activation
        # The original weights are saved (autograd checks they are not modified in place before
        # backward); their upcast copies come from the cache again in backward.
        ctx.save_for_backward(x_c, w_in_EXD, w_out_EDF, h_NX, s_NF, a_NF)
        return y_ND.to(ctx.dtypes[0])

    @staticmethod
    def backward(ctx, gy_ND):
        x_ND, w_in_EXD, w_out_EDF, h_NX, silu_gate, a_NF = ctx.saved_tensors
        g_x, g_w_in, g_w_out = ffn_backward(
            ctx.groups,
            gy_ND,
            x_ND,
            h_NX,
            a_NF,
            w_in_EXD,
            w_out_EDF,
            lambda da, h: _act_backward(da, h, ctx.activation, silu_gate),
            ctx.cd,
            ctx.dtypes,
            ctx.needs_input_grad[:3],
        )
        return g_x, g_w_in, g_w_out, None, None, None


def ffn_backward(groups, gy_ND, x_ND, h_NX, a_NF, w_in, w_out, act_backward, cd, dtypes, needs):
    """Gradients ``(x, w_in, w_out)`` of ``y = act(x W_in^T) W_out^T`` per expert from the
    forward's residuals (``x`` in the compute dtype ``cd``, pre-activation ``h``, activation
    ``a``), with the grouped GEMMs and no autograd: ``dW_out = dy^T a``, ``da = dy W_out``,
    ``dh = act_backward(da, h)``, ``dW_in = dh^T x``, ``dx = dh W_in``. ``dtypes``: those of
    (x, w_in, w_out) for the results; ``needs``: which of the three to compute (else None)."""
    w_in_c, w_out_c = _UPCAST.get(w_in, cd), _UPCAST.get(w_out, cd)
    gy_ND = gy_ND.to(x_ND.dtype).contiguous()
    g_w_out = groups.wgrad(gy_ND, a_NF) if needs[2] else None
    g_x = g_w_in = None
    if needs[0] or needs[1]:
        da_NF = groups.linear_t(gy_ND, w_out_c)
        dh_NX = act_backward(da_NF, h_NX)
        del da_NF
        g_w_in = groups.wgrad(dh_NX, x_ND) if needs[1] else None
        g_x = groups.linear_t(dh_NX, w_in_c) if needs[0] else None
    x_dt, wi_dt, wo_dt = dtypes
    return (
        None if g_x is None else g_x.to(x_dt),
        None if g_w_in is None else g_w_in.to(wi_dt),
        None if g_w_out is None else g_w_out.to(wo_dt),
    )


def activation_pair(activation: str):
    """``(forward(h) -> a, backward(da, h) -> dh)`` of the kernel activation ``"swiglu"`` or
    ``"gelu"`` (SwiGLU's backward writes both halves of dh in place)."""
    if activation not in ACTIVATIONS:
        raise InputError(f"activation={activation!r} is not allowed: one of {ACTIVATIONS}")
    return (
        lambda h: _act_forward(h, activation),
        lambda da, h: _act_backward(da, h, activation),
    )


def groups_of(counts_E: torch.Tensor, n_rows: int, impl: str) -> _Groups:
    """The grouping of ``n_rows`` rows by expert (``counts_E``) that :func:`ffn_backward`
    takes, for ``impl`` ``"grouped_mm"`` or ``"bmm"``."""
    return _Groups(counts_E.to(dtype=torch.long), n_rows, impl)


def ffn_forward_saving(x_ND, counts_E, w_in, w_out, act_forward, impl: str):
    """``(y_ND, (x_c, h_NX, a_NF), groups)``: the grouped FFN forward keeping what
    :func:`ffn_backward` needs (input in the compute dtype, pre-activation, activation), with
    ``act_forward(h) -> a`` for any activation. ``impl``: ``"grouped_mm"`` or ``"bmm"``."""
    cd = compute_dtype(x_ND)
    x_c = x_ND.to(cd).contiguous()
    counts_E = counts_E.to(device=x_ND.device, dtype=torch.long)
    groups = _Groups(counts_E, x_ND.shape[0], impl)
    h_NX = groups.linear(x_c, _UPCAST.get(w_in, cd))
    a_NF = act_forward(h_NX)
    y_ND = groups.linear(a_NF, _UPCAST.get(w_out, cd))
    return y_ND.to(x_ND.dtype), (x_c, h_NX, a_NF), groups


def expert_ffn_reference(x_ND, counts_E, w_in_EXD, w_out_EDF, activation):
    """Plain per-expert loop through autograd. Slow and obviously right: the test oracle."""
    outs = []
    for e, x_e in enumerate(x_ND.split(counts_E.tolist())):
        if x_e.shape[0] == 0:
            continue
        h = F.linear(x_e, w_in_EXD[e])
        outs.append(F.linear(_act_forward(h, activation), w_out_EDF[e]))
    if not outs:
        return x_ND.new_zeros(0, w_out_EDF.shape[1]) + 0 * w_out_EDF.sum() + 0 * w_in_EXD.sum()
    return torch.cat(outs)


def expert_ffn(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    w_in: torch.Tensor,
    w_out: torch.Tensor,
    activation: str = "swiglu",
    impl: str = "auto",
) -> torch.Tensor:
    """Grouped expert FFN over rows grouped by expert.

    Args:
        x_ND: rows grouped by expert, in expert order.
        counts_E: rows per expert (long), ``counts_E.sum() == N``.
        w_in: (E, 2F, D) for SwiGLU (gate rows, then up rows) or (E, F, D) for GELU.
        w_out: (E, D, F).
        activation: ``"swiglu"`` or ``"gelu"`` (tanh approximation, as GPT-2).
        impl: ``"auto"``, ``"grouped_mm"``, ``"bmm"`` or ``"loop"``.

    With an F-slice of the weights (expert-sharding parallelism) the result is that slice's
    partial sum; the partials of all slices add up to the full result.
    """
    if activation not in ACTIVATIONS:
        raise InputError(f"activation={activation!r} is not allowed: one of {ACTIVATIONS}")
    if x_ND.dim() != 2:
        raise InputError(f"x_ND must be 2-D (rows, hidden); got shape {tuple(x_ND.shape)}")
    E = w_in.shape[0]
    if counts_E.shape != (E,):
        raise InputError(f"counts_E must have shape ({E},); got {tuple(counts_E.shape)}")
    impl = resolve_impl(impl, x_ND)
    if impl == "loop":
        return expert_ffn_reference(x_ND, counts_E, w_in, w_out, activation)
    counts_E = counts_E.to(device=x_ND.device, dtype=torch.long)
    return ExpertFFNFunction.apply(x_ND.contiguous(), w_in, w_out, counts_E, activation, impl)
