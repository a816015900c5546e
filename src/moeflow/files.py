"""Writing outputs safely: the rules every moeflow command that writes a file or directory
follows (pure Python, no torch).

* :func:`check_output`, called before any work: an output that is one of the inputs (the same
  inode, so also through a symlink, a hard link or ``./dir/``), a file inside an input
  directory, a directory that holds an input, a file where a directory is expected (or the
  other way round), a missing or read-only parent directory, and an existing output without
  ``force`` (the command line's ``--force``) raise :class:`moeflow.errors.InputError` naming
  the flag.
* :func:`atomic_path` / :func:`atomic_file` / :func:`atomic_dir`: the output is written under
  a temporary name in its own directory and renamed over the target only when complete; on
  any error, Ctrl-C or SIGTERM the temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from moeflow.errors import InputError

#: temporary outputs start with this (hidden, next to the target)
TMP_PREFIX = ".tmp-"


def _same(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def _inside(inner: str, outer: str) -> bool:
    """True when ``inner`` is ``outer`` or lies below it (after resolving symlinks)."""
    i, o = os.path.realpath(inner), os.path.realpath(outer)
    try:
        return os.path.commonpath([i, o]) == o
    except ValueError:  # different drives
        return False


def _entries(d: str) -> list[str]:
    """The regular files directly inside directory ``d`` (empty when unreadable)."""
    try:
        with os.scandir(d) as it:
            return [e.path for e in it if e.is_file()]
    except OSError:
        return []


def check_output(
    flag: str,
    path,
    *,
    inputs: Iterable = (),
    force: bool = False,
    directory: bool = False,
) -> str | None:
    """Check output ``path`` (a file, or with ``directory`` a directory) before any work and
    return it as a ``str`` (None stays None). ``inputs`` are the paths the command reads
    (files or directories; None entries are skipped). Raises InputError naming ``flag``."""
    if path is None:
        return None
    p = os.fspath(path)
    if not p:
        raise InputError(f"{flag} is an empty path")
    what = "a directory" if directory else "a file path"
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        raise InputError(f"{flag} {p!r}: directory {parent!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {p!r}: directory {parent!r} is not writable")
    exists = os.path.lexists(p)
    for src in inputs:
        if src is None:
            continue
        s = os.fspath(src)
        if not os.path.exists(s):
            continue
        if exists and _same(p, s):
            raise InputError(f"{flag} {p!r} is the input {s!r}; write to another path")
        if os.path.isdir(s):
            if directory and (_inside(p, s) or _inside(s, p)):
                raise InputError(
                    f"{flag} {p!r} overlaps the input directory {s!r}; write elsewhere"
                )
            if not directory and exists and any(_same(p, e) for e in _entries(s)):
                raise InputError(
                    f"{flag} {p!r} is a file of the input directory {s!r}; write elsewhere"
                )
        elif directory and _inside(s, p):
            raise InputError(f"{flag} {p!r} holds the input {s!r}; write elsewhere")
    if exists:
        is_dir = os.path.isdir(p)
        if is_dir and not directory:
            raise InputError(f"{flag} {p!r} is a directory, expected {what}")
        if directory and not is_dir:
            raise InputError(f"{flag} {p!r} exists and is not a directory, expected {what}")
        if not force:
            raise InputError(f"{flag} {p!r} exists; pass --force to overwrite it")
    return p


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


@contextmanager
def atomic_path(
    path, *, force: bool = True, before_commit: Callable[[], None] | None = None
) -> Iterator[str]:
    """Yield a temporary file name next to ``path`` (same extension, so writers that pick a
    format by extension still do); when the block ends without an error the file is given
    the usual mode and renamed over ``path``. ``before_commit`` runs just before the rename.
    Without ``force``, a ``path`` that appeared meanwhile is not replaced (InputError)."""
    p = os.fspath(path)
    d = os.path.dirname(os.path.abspath(p))
    base = os.path.basename(p)
    fd, tmp = tempfile.mkstemp(
        prefix=TMP_PREFIX + base + "-", suffix=os.path.splitext(base)[1], dir=d
    )
    os.close(fd)
    try:
        yield tmp
        if before_commit is not None:
            before_commit()
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600
        if not force and os.path.lexists(p):
            raise InputError(f"output {p!r} appeared while writing; pass --force to overwrite it")
        os.replace(tmp, p)
        tmp = None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass


@contextmanager
def atomic_file(
    path,
    mode: str = "w",
    *,
    force: bool = True,
    before_commit: Callable[[], None] | None = None,
):
    """Yield an open file (``mode`` "w" or "wb") whose content replaces ``path`` only on
    success; the data are flushed and fsynced before the rename (see :func:`atomic_path`)."""
    if mode not in ("w", "wb"):
        raise ValueError(f"mode {mode!r}: 'w' or 'wb'")
    with atomic_path(path, force=force, before_commit=before_commit) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())


@contextmanager
def atomic_dir(path, *, force: bool = False) -> Iterator[str]:
    """Yield an empty temporary directory next to ``path``; when the block ends without an
    error it replaces ``path`` as a whole (an existing directory only with ``force``; its old
    content is removed, never mixed with the new)."""
    p = os.fspath(path).rstrip(os.sep) or os.sep
    d = os.path.dirname(os.path.abspath(p))
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX + os.path.basename(p) + "-", dir=d)
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if os.path.lexists(p):
            if not force:
                raise InputError(
                    f"output {p!r} appeared while writing; pass --force to overwrite it"
                )
            old = tmp + ".old"
            os.rename(p, old)
            try:
                os.rename(tmp, p)
            except BaseException:
                os.rename(old, p)
                old = None
                raise
        else:
            os.rename(tmp, p)
        tmp = None
    finally:
        for leftover in (tmp, old):
            if leftover is None:
                continue
            if os.path.islink(leftover) or not os.path.isdir(leftover):
                try:
                    os.unlink(leftover)
                except FileNotFoundError:
                    pass
            else:
                shutil.rmtree(leftover, ignore_errors=True)
