"""Small argument validators shared by every module (pure Python, no torch).

Each raises :class:`moeflow.errors.ConfigError` naming the field, the value and what is
allowed, so a bad value reads the same wherever it is caught; :func:`output_file` checks a
path on disk and raises :class:`moeflow.errors.InputError` naming the flag.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from pathlib import Path

from moeflow.errors import ConfigError, InputError


def is_int(v) -> bool:
    """True for Python and numpy integers, False for bools and floats."""
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def positive_int(
    name: str,
    v,
    *,
    maximum: int | None = None,
    maximum_name: str | None = None,
    allow_none: bool = False,
):
    """``v`` as an ``int`` when it is an integer >= 1 (and <= ``maximum``), else ConfigError.

    ``maximum_name`` names where the bound comes from, so the message reads
    ``an int in [1, n_group=4]`` rather than a bare number.
    """
    if v is None and allow_none:
        return None
    bound = maximum if maximum_name is None else f"{maximum_name}={maximum}"
    allowed = "a positive int" if maximum is None else f"an int in [1, {bound}]"
    if allow_none:
        allowed = "None or " + allowed
    if not is_int(v) or v < 1 or (maximum is not None and v > maximum):
        raise ConfigError(name, v, allowed)
    return int(v)


def nonnegative_int(name: str, v) -> int:
    """``v`` as an ``int`` when it is an integer >= 0, else ConfigError."""
    if not is_int(v) or v < 0:
        raise ConfigError(name, v, "a non-negative int")
    return int(v)


def positive_float(name: str, v, *, allow_zero: bool = False) -> float:
    """``v`` as a finite ``float`` > 0 (>= 0 with ``allow_zero``), else ConfigError."""
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v < 0 or (v == 0 and not allow_zero):
        raise ConfigError(name, v, "a finite number >= 0" if allow_zero else "a finite number > 0")
    return float(v)


def output_file(flag: str, path) -> None:
    """Before any work: ``path`` (if not None) is not a directory and its directory exists and
    is writable, else InputError naming ``flag`` (e.g. ``--out``). For CLIs that write a file
    at the end of a long run, so a typo fails at once instead of after the run."""
    if path is None:
        return
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise InputError(f"{flag} {str(path)!r} is a directory, expected a file path")
    if not parent.is_dir():
        raise InputError(f"{flag} {str(path)!r}: directory {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {str(path)!r}: directory {str(parent)!r} is not writable")


def read_json_file(path, flag: str, max_bytes: int):
    """The parsed JSON object in ``path`` (at most ``max_bytes``); InputError naming ``flag``,
    the file and the fault."""
    where = f"{flag} {str(path)!r}"
    try:
        p = Path(path)
        if not p.exists():
            raise InputError(f"{where}: no such file")
        if not p.is_file():
            raise InputError(f"{where}: not a regular file")
        size = p.stat().st_size
        if size > max_bytes:
            raise InputError(
                f"{where}: {size} bytes, larger than the {max_bytes} byte limit for a JSON file"
            )
        d = json.loads(p.read_bytes().decode("utf-8"))
    except InputError:
        raise
    except OSError as e:
        raise InputError(f"{where}: cannot read it: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{where}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InputError(
            f"{where}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
        ) from None
    except RecursionError:
        raise InputError(f"{where}: JSON nested too deeply") from None
    if not isinstance(d, dict):
        raise InputError(f"{where}: expected a JSON object, got {type(d).__name__}")
    return d
