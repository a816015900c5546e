"""A dependency-free progress bar for the command line (stderr, single line, rate-limited)."""

from __future__ import annotations

import sys
import time


class Progress:
    """``with Progress(total, "train") as bar: bar.update(1, loss=2.3)``.

    Redraws at most 10 times a second; on a non-terminal stream it prints a line every
    ``log_every`` seconds instead, so CI logs stay short. ``enabled=False`` (for example on
    every rank but 0) keeps the counts and prints nothing.
    """

    def __init__(
        self,
        total: int | None,
        desc: str = "",
        stream=None,
        width: int = 24,
        log_every: float = 5.0,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self.total = total
        self.desc = desc
        self.stream = stream or sys.stderr
        self.width = width
        self.n = 0
        self.fields: dict[str, str] = {}
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._drawn_n = -1
        self._interval = 0.1 if self._isatty() else log_every

    def _isatty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def update(self, n: int = 1, **fields) -> None:
        self.n += n
        for k, v in fields.items():
            self.fields[k] = f"{v:.4g}" if isinstance(v, float) else str(v)
        now = time.perf_counter()
        if not self.enabled:
            return
        if now - self._last_draw >= self._interval or (self.total and self.n >= self.total):
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        self._drawn_n = self.n
        elapsed = now - self.start
        if self.total:
            frac = min(1.0, self.n / self.total)
            filled = int(frac * self.width)
            bar = "#" * filled + "." * (self.width - filled)
            head = f"{self.desc} [{bar}] {100 * frac:5.1f}% {self.n}/{self.total}"
        else:
            head = f"{self.desc} {self.n}"
        tail = " ".join(f"{k} {v}" for k, v in self.fields.items())
        line = f"{head} {elapsed:6.1f}s {tail}"
        if self._isatty():
            self.stream.write("\r" + line + "\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._drawn_n != self.n:
            self._draw(time.perf_counter())
        if self._isatty():
            self.stream.write("\n")
        self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
