"""Suite-wide settings, applied before any test module is imported.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so it must be set before the first
import of any module that defines kernels, whichever test happens to import it first: every
Triton kernel in the suite runs on CPU through Triton's interpreter. (Tests that need real
compilation, such as the sm_90 compile check, run in a child process with it unset.)
"""

import os

import pytest

os.environ["TRITON_INTERPRET"] = "1"


class _RunsCode:
    """Unpickling an instance runs a shell command that creates ``marker``: the payload of a
    crafted checkpoint file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import shlex

        return os.system, (f"touch {shlex.quote(self.marker)}",)


@pytest.fixture
def code_pickle(tmp_path):
    """``.payload`` (an object whose unpickling creates ``.marker``) and ``.marker``; a test
    writes the payload into a checkpoint file and asserts ``.marker`` never appears."""
    from types import SimpleNamespace

    marker = tmp_path / "code-ran"
    return SimpleNamespace(payload=_RunsCode(marker), marker=marker)
