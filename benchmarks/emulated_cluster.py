"""An emulated cluster on one machine: nodes are network namespaces behind shaped links.

Each node is a Linux network namespace with one veth interface (``IFACE``) whose other end
sits on a bridge in a "switch" namespace. Both ends of every node's link are shaped by the
kernel's token-bucket filter (``tc qdisc ... tbf rate R burst 256kb latency 50ms``), so a
slow inter-node link costs wall time, not CPU: the kernel holds the packets, the sender
sleeps in its socket, as with a real NIC. Ranks inside one node talk over the node's own
stack (loopback speed). netem is not assumed (it is absent on the machines we use); the
link has a rate limit and a queue, no added propagation delay.

Needs root, ``ip`` and ``tc`` (iproute2). Without them :func:`unavailable` returns the
reason and the benchmark reports the emulated cells as skipped with it.

    python benchmarks/emulated_cluster.py up 2 1gbit     # two nodes at 1 Gbit/s each way
    python benchmarks/emulated_cluster.py exec 0 -- hostname -I
    python benchmarks/emulated_cluster.py addr 1          # 10.78.0.2
    python benchmarks/emulated_cluster.py down

Gloo chooses its interface from the hostname unless told: processes started through
:func:`node_command` get ``GLOO_SOCKET_IFNAME`` set to the node's interface.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence

#: namespace prefix (switch: PREFIX + "sw", nodes: PREFIX + "0", PREFIX + "1", ...)
PREFIX = "mfpe"
#: the node-side interface name (what GLOO_SOCKET_IFNAME names)
IFACE = "mfpe0"
SUBNET = "10.78.0"
MAX_NODES = 16


class ClusterError(RuntimeError):
    """A namespace or link command failed (the message carries the command and stderr)."""


def unavailable() -> str | None:
    """None when an emulated cluster can be built here, else the reason it cannot."""
    if sys.platform != "linux":
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "needs root (network namespaces and tc); run the benchmark as root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"'{tool}' (iproute2) is not installed"
    return None


def addr(i: int) -> str:
    """IPv4 address of node ``i``."""
    return f"{SUBNET}.{i + 1}"


def _ns(i) -> str:
    return f"{PREFIX}{i}"


def _run(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise ClusterError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")


def _in(ns: str, *cmd: str) -> None:
    _run("ip", "netns", "exec", ns, *cmd)


def namespaces() -> list[str]:
    """The namespaces this module made (and did not remove yet)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    return [n for n in names if n.startswith(PREFIX)]


def down() -> None:
    """Remove every namespace (and with them every link) this module made."""
    for ns in namespaces():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def up(nodes: int, rate: str, latency: str = "50ms", burst: str = "256kb") -> list[str]:
    """Build ``nodes`` namespaces on a bridge, every link shaped to ``rate`` both ways.

    Returns the node addresses. Replaces a cluster left by an earlier call.
    """
    reason = unavailable()
    if reason:
        raise ClusterError(f"emulated cluster unavailable: {reason}")
    if not (isinstance(nodes, int) and 2 <= nodes <= MAX_NODES):
        raise ValueError(f"nodes={nodes!r}: expected an int in 2..{MAX_NODES}")
    down()
    sw = _ns("sw")
    try:
        _run("ip", "netns", "add", sw)
        _in(sw, "ip", "link", "add", "br0", "type", "bridge")
        _in(sw, "ip", "link", "set", "br0", "up")
        for i in range(nodes):
            ns, port = _ns(i), f"p{i}"
            _run("ip", "netns", "add", ns)
            # create the pair inside the node so its end never lands in the caller's namespace
            _in(ns, "ip", "link", "add", IFACE, "type", "veth", "peer", "name", port, "netns", sw)
            _in(ns, "ip", "addr", "add", f"{addr(i)}/24", "dev", IFACE)
            _in(ns, "ip", "link", "set", IFACE, "up")
            _in(ns, "ip", "link", "set", "lo", "up")
            _in(sw, "ip", "link", "set", port, "master", "br0")
            _in(sw, "ip", "link", "set", port, "up")
            for where, dev in ((ns, IFACE), (sw, port)):  # shape both directions
                _in(
                    where,
                    "tc",
                    "qdisc",
                    "add",
                    "dev",
                    dev,
                    "root",
                    "tbf",
                    "rate",
                    rate,
                    "burst",
                    burst,
                    "latency",
                    latency,
                )
    except BaseException:
        down()
        raise
    return [addr(i) for i in range(nodes)]


def node_command(i: int, cmd: Sequence[str], env: dict | None = None) -> list[str]:
    """``cmd`` wrapped to run inside node ``i`` (with GLOO_SOCKET_IFNAME and ``env``)."""
    extra = {"GLOO_SOCKET_IFNAME": IFACE, **(env or {})}
    return ["ip", "netns", "exec", _ns(i), "env", *[f"{k}={v}" for k, v in extra.items()], *cmd]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: emulated_cluster.py up N RATE [LATENCY] | addr I | exec I -- CMD... | down | check"
    )
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    op = argv[0]
    reason = unavailable()
    if op == "check":
        print("emulated cluster: available" if reason is None else f"emulated cluster: {reason}")
        return 0
    if op == "addr" and len(argv) == 2:
        print(addr(int(argv[1])))
        return 0
    if reason is not None:
        print(f"emulated cluster: skipped: {reason}")
        return 0
    if op == "up" and len(argv) in (3, 4):
        addrs = up(int(argv[1]), argv[2], *(argv[3:4]))
        print(f"emulated cluster: {len(addrs)} nodes at {argv[2]}: {' '.join(addrs)}")
        return 0
    if op == "down" and len(argv) == 1:
        down()
        return 0
    if op == "exec" and len(argv) >= 3:
        rest = argv[2:]
        if rest[0] == "--":
            rest = rest[1:]
        return subprocess.call(node_command(int(argv[1]), rest))
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
