"""Emulated clusters built by these tests use a namespace prefix of their own per pytest
worker (``MOEFLOW_EMU_PREFIX``, read when ``benchmarks/emulated_cluster.py`` is imported, which
happens after this hook), so two xdist workers, or a benchmark running beside the suite, never
tear down each other's namespaces. Letters only: a prefix ending in a digit would read as
another prefix's node names."""

import os
import string


def pytest_configure(config):
    worker = getattr(config, "workerinput", {}).get("workerid", "")  # "gw0", "gw1", ...
    if worker[2:].isdigit():  # a worker inherits the controller's environment: overwrite it
        os.environ["MOEFLOW_EMU_PREFIX"] = "mft" + string.ascii_lowercase[int(worker[2:]) % 26]
    else:
        os.environ.setdefault("MOEFLOW_EMU_PREFIX", "mfts")
