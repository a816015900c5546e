"""Suite-wide settings, applied before any test module is imported.

Triton reads ``TRITON_INTERPRET`` when a kernel is decorated, so it must be set before the first
import of any module that defines kernels, whichever test happens to import it first: every
Triton kernel in the suite runs on CPU through Triton's interpreter. (Tests that need real
compilation, such as the sm_90 compile check, run in a child process with it unset.)
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
