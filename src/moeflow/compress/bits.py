"""Dtype tables and raw-bit views: how a tensor's values are seen by every codec.

Every codec works on the raw bit patterns of a tensor (``uint16`` for bf16/fp16, ``uint32``
for fp32), never on float values, so NaN payloads, signed zeros and subnormals survive
(the lossless premise of DFloat11, Zhang et al. 2025, and ZipNN, Hershcovitch et al. 2024).

This module imports neither numba nor the codecs, so the container, the codecs and the
statistics all build on it without importing each other. ``check_shape`` is the one shape
rule shared by the writers and the readers of every format, so nothing is written that a
reader would later refuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moeflow.errors import InputError

# the one unsigned-int dtype of each item size
UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

MAX_NDIM = 32
MAX_DIM = 1 << 48  # per dimension
MAX_NUMEL = 1 << 48  # per tensor (2**48 bf16 values are 512 TiB)


@dataclass(frozen=True)
class DTypeSpec:
    """Bit layout of a floating-point format: ``sign | exponent | mantissa``."""

    name: str
    code: int
    itemsize: int
    exp_bits: int
    man_bits: int

    @property
    def bits(self) -> int:
        return 8 * self.itemsize

    @property
    def uint(self):
        return UINT[self.itemsize]


FLOAT_SPECS = {
    "bfloat16": DTypeSpec("bfloat16", 1, 2, 8, 7),
    "float16": DTypeSpec("float16", 2, 2, 5, 10),
    "float32": DTypeSpec("float32", 3, 4, 8, 23),
}

# Every dtype safetensors knows, so the raw codec can store any tensor of a checkpoint.
# code -> (name, itemsize)
ALL_DTYPES = {
    1: ("bfloat16", 2),
    2: ("float16", 2),
    3: ("float32", 4),
    4: ("float64", 8),
    5: ("int8", 1),
    6: ("uint8", 1),
    7: ("int16", 2),
    8: ("uint16", 2),
    9: ("int32", 4),
    10: ("uint32", 4),
    11: ("int64", 8),
    12: ("uint64", 8),
    13: ("bool", 1),
    14: ("float8_e4m3fn", 1),
    15: ("float8_e5m2", 1),
}
DTYPE_CODES = {name: code for code, (name, _) in ALL_DTYPES.items()}
DTYPE_ITEMSIZE = {name: size for _, (name, size) in ALL_DTYPES.items()}

# safetensors' dtype strings
SAFETENSORS_NAMES = {
    "BF16": "bfloat16",
    "F16": "float16",
    "F32": "float32",
    "F64": "float64",
    "I8": "int8",
    "U8": "uint8",
    "I16": "int16",
    "U16": "uint16",
    "I32": "int32",
    "U32": "uint32",
    "I64": "int64",
    "U64": "uint64",
    "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
}


def float_spec(dtype: str) -> DTypeSpec:
    try:
        return FLOAT_SPECS[dtype]
    except KeyError:
        raise InputError(
            f"dtype {dtype!r} has no float bit layout here; allowed: {sorted(FLOAT_SPECS)}"
        ) from None


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_shape(shape, error=InputError, what: str = "shape") -> tuple[int, ...]:
    """``shape`` as a tuple of ints when every format can store it, else ``error``.

    At most ``MAX_NDIM`` dimensions, each an int in ``[0, MAX_DIM]``, with at most
    ``MAX_NUMEL`` elements (an exact Python-int product, so it cannot overflow). Writers
    pass ``InputError`` and readers ``CorruptDataError``: both apply the same rule."""
    if not isinstance(shape, (list, tuple)):
        raise error(f"{what} is {type(shape).__name__}; expected a list of ints")
    if len(shape) > MAX_NDIM:
        raise error(f"{what} has {len(shape)} dimensions; at most {MAX_NDIM} allowed")
    for s in shape:
        if not _is_int(s) or not 0 <= s <= MAX_DIM:
            raise error(
                f"{what} {list(shape)!r} has dimension {s!r}; each must be an int in [0, 2**48]"
            )
    out = tuple(int(s) for s in shape)
    if math.prod(out) > MAX_NUMEL:
        raise error(f"{what} {list(out)} has {math.prod(out)} elements; at most 2**48 allowed")
    return out


def numel(shape) -> int:
    """Element count of a shape (Python ints: exact; 1 for a scalar)."""
    return math.prod(int(s) for s in shape)


def readonly(a: np.ndarray) -> np.ndarray:
    """A read-only view. Kernels only read their inputs; passing every input read-only gives
    numba one signature per kernel instead of two, which halves cold compile time."""
    v = a.view()
    v.flags.writeable = False
    return v


def words_view(b: np.ndarray) -> np.ndarray:
    """Read-only uint64 view of the whole-word prefix of a uint8 array (no copy)."""
    return readonly(b[: b.size // 8 * 8].view(np.uint64))


# ----------------------------------------------------------------------------- torch glue
def tensor_to_bits(t):
    """(flat raw bits as numpy, dtype name, shape) of a tensor; never writes to ``t``."""
    import torch

    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.array(t, copy=True))
    if not isinstance(t, torch.Tensor):
        raise InputError(f"expected a torch.Tensor, got {type(t).__name__}")
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPE_CODES:
        raise InputError(f"dtype {t.dtype} is not supported; allowed: {sorted(DTYPE_CODES)}")
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    uint = UINT[DTYPE_ITEMSIZE[name]]
    bits = flat.view(torch.uint8).numpy().view(uint) if flat.numel() else np.empty(0, uint)
    return bits, name, tuple(t.shape)


def bits_to_tensor(bits: np.ndarray, dtype: str, shape):
    """The tensor of ``dtype`` and ``shape`` whose raw bits are ``bits`` (no copy if
    writable)."""
    import torch

    u8 = np.ascontiguousarray(bits).reshape(-1).view(np.uint8)
    t = torch.from_numpy(u8.copy() if not u8.flags.writeable else u8)
    return t.view(getattr(torch, dtype)).reshape(shape)


def copy_into(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``bits`` copied into the caller's flat ``out`` array."""
    bits = bits.reshape(-1)
    if out.dtype != bits.dtype or out.shape != bits.shape or not out.flags.c_contiguous:
        raise InputError(f"out must be a contiguous {bits.dtype.name}[{bits.size}] array")
    out[:] = bits
    return out


def out_bits(out, dtype: str, shape) -> np.ndarray:
    """The raw-bits numpy view of a caller's ``out`` tensor, after checking it fits."""
    import torch

    if not isinstance(out, torch.Tensor):
        raise InputError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if (
        str(out.dtype).removeprefix("torch.") != dtype
        or tuple(out.shape) != tuple(shape)
        or out.device.type != "cpu"
        or not out.is_contiguous()
    ):
        raise InputError(
            f"out must be a contiguous CPU {dtype} tensor of shape {tuple(shape)}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    if out.requires_grad and torch.is_grad_enabled():
        raise InputError("out requires grad; decode into it under torch.no_grad()")
    flat = out.detach().reshape(-1)
    if flat.numel() == 0:
        return np.empty(0, UINT[DTYPE_ITEMSIZE[dtype]])
    return flat.view(torch.uint8).numpy().view(UINT[DTYPE_ITEMSIZE[dtype]])
