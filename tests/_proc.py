"""Helpers for tests that start a child process and signal it."""

import signal


def default_sigint() -> None:
    """``preexec_fn`` of such a child: SIGINT's default action. A test run started as a
    shell's background job inherits SIGINT ignored, and Python then installs no
    KeyboardInterrupt handler, so the SIGINT a test sends would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
