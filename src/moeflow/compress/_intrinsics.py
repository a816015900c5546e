"""LLVM intrinsics for the numba kernels: unaligned loads and stores, and an atomic add.

- numpy views need aligned offsets and numba has no unaligned access of its own, so a bit
  stream would otherwise be read as two aligned words plus shifts, and written byte by byte.
  ``load_u64`` and ``store_u32`` emit one ``align 1`` load or store (a plain ``mov`` on x86-64
  and AArch64). They do no bounds checks: callers keep ``index + width <= size``.
- ``fetch_add`` is an atomic read-modify-write, so that threads running numba kernels can
  share a work counter without the GIL (see ``parallel.run_shared``).
"""

from __future__ import annotations

from moeflow._deps import require

require("numba", "moeflow.compress")  # a missing numba names the extra to install

from llvmlite import ir  # noqa: E402  (numba's own dependency)
from numba import types  # noqa: E402
from numba.extending import intrinsic  # noqa: E402


def _elem_ptr(context, builder, arrty, arr, index, width=None):
    ary = context.make_array(arrty)(context, builder, arr)
    ptr = builder.gep(ary.data, [index])
    return ptr if width is None else builder.bitcast(ptr, ir.IntType(width).as_pointer())


def _c_array(arr, dtype, mutable=False):
    return (
        isinstance(arr, types.Array)
        and arr.dtype == dtype
        and arr.layout == "C"
        and (arr.mutable or not mutable)
    )


@intrinsic
def load_u64(typingctx, arr, index):
    """The 8 bytes ``arr[index:index + 8]`` as a little-endian uint64 (``arr``: uint8)."""
    if not (_c_array(arr, types.uint8) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        return builder.load(_elem_ptr(context, builder, sig.args[0], args[0], args[1], 64), align=1)

    return types.uint64(arr, index), codegen


@intrinsic
def store_u32(typingctx, arr, index, value):
    """Write the low 32 bits of ``value`` to ``arr[index:index + 4]`` (``arr``: uint8)."""
    if not (
        _c_array(arr, types.uint8, mutable=True)
        and isinstance(index, types.Integer)
        and isinstance(value, types.Integer)
    ):
        return None

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1], 32)
        v = args[2]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        builder.store(v, ptr, align=1)
        return context.get_dummy_value()

    return types.void(arr, index, value), codegen


@intrinsic
def fetch_add(typingctx, arr, index, value):
    """Atomically ``arr[index] += value``; returns the old value (``arr``: int64)."""
    if not (
        _c_array(arr, types.int64, mutable=True)
        and isinstance(index, types.Integer)
        and isinstance(value, types.Integer)
    ):
        return None

    def codegen(context, builder, sig, args):
        ptr = _elem_ptr(context, builder, sig.args[0], args[0], args[1])
        v = context.cast(builder, args[2], sig.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, v, "monotonic")

    return types.int64(arr, index, value), codegen
