"""Triton kernels run on CPU through Triton's interpreter in these tests.

``TRITON_INTERPRET`` is read when a kernel is decorated, so it is set here, before any test
module imports ``moeflow.compress.gpu``. Nothing outside this folder imports triton. The sm_90
compile test needs real (not interpreted) kernels and runs them in a child process.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"
