"""Small helpers shared by the benchmark scripts (imported as ``_common`` from benchmarks/)."""

from __future__ import annotations

import platform


def cpu_name() -> str:
    """The CPU model name, for the machine line of a results record."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
