"""An emulated cluster on one machine: nodes are network namespaces behind shaped links.

Each node is a Linux network namespace with one veth interface (``IFACE``) whose other end
sits on a bridge in a "switch" namespace. Links are shaped by the kernel, so a slow link
costs wall time, not CPU: the kernel holds the packets, the sender sleeps in its socket, as
with a real NIC. Ranks inside one node talk over the node's own stack (loopback speed).
netem is not assumed (it is absent on the machines we use); a link has a rate limit and a
queue, no added propagation delay.

Two shapes of cluster:

- :func:`up`: one rate for every node's link, both ways. Both ends of the link carry the
  token-bucket filter (``tc qdisc ... tbf rate R burst 256kb latency 50ms``).
- :func:`up_matrix` / :func:`up_sites`: a rate per ordered pair of nodes, ``rates[i][j]`` for
  the bytes node ``i`` sends to node ``j`` (asymmetric matrices are fine). Each node's egress
  carries an HTB qdisc with one class per shaped destination (``rate = ceil = rates[i][j]``),
  a u32 filter on the destination address that steers the pair's packets into its class, and
  a byte FIFO under the class that holds ``rate x latency + burst`` bytes (the same queue
  bound tbf's ``latency`` sets in :func:`up`). Pairs marked ``None`` and non-IP packets (ARP)
  match no filter and leave unshaped. The switch side is not shaped: a pair's rate is
  enforced where its bytes enter the network, so the link ``i -> j`` does not share its rate
  with ``i -> k``. Generic segmentation on a shaped node is capped at ~2 ms of its slowest
  pair's bytes (at least one frame): HTB charges a 64 KB TCP super-packet as one packet, and
  one larger than a slow pair's queue is dropped whole, again and again (without the cap a
  5 Mbit/s pair delivered about 0.1 Mbit/s).

Needs root, ``ip`` and ``tc`` (iproute2). Without them :func:`unavailable` returns the
reason and the benchmark reports the emulated cells as skipped with it. The rate matrix also
needs the kernel's ``htb`` and ``bfifo`` qdiscs and ``u32`` classifier; where ``htb`` is
missing :func:`up_matrix` raises :class:`ClusterError` saying so (and leaves nothing behind).

    python benchmarks/emulated_cluster.py up 2 1gbit     # two nodes at 1 Gbit/s each way
    python benchmarks/emulated_cluster.py up-matrix '[[null,"20mbit"],["5mbit",null]]'  # 0->1, 1->0
    python benchmarks/emulated_cluster.py up-sites 2,2 1gbit 10mbit   # two sites, 10 Mbit/s between
    python benchmarks/emulated_cluster.py exec 0 -- hostname -I
    python benchmarks/emulated_cluster.py addr 1          # 10.78.0.2
    python benchmarks/emulated_cluster.py down

Gloo chooses its interface from the hostname unless told: processes started through
:func:`node_command` get ``GLOO_SOCKET_IFNAME`` set to the node's interface.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence

#: namespace prefix (switch: PREFIX + "sw", nodes: PREFIX + "0", PREFIX + "1", ...); set
#: MOEFLOW_EMU_PREFIX to run two emulated clusters side by side (each tears down only its own)
PREFIX = os.environ.get("MOEFLOW_EMU_PREFIX", "mfpe")
if not re.fullmatch(r"[a-z][a-z0-9]{0,7}", PREFIX):
    raise ValueError(f"MOEFLOW_EMU_PREFIX={PREFIX!r}: expected 1-8 lowercase letters or digits")
#: the node-side interface name (what GLOO_SOCKET_IFNAME names)
IFACE = "mfpe0"
SUBNET = "10.78.0"
MAX_NODES = 16
#: bytes of one full-size frame on the veth links (MTU 1500 + Ethernet header)
FRAME_BYTES = 1514

Rate = str | int | float | None

# iproute2's units (tc(8), "PARAMETERS"), matched case-insensitively as tc does
_RATE_UNITS = {
    "bit": 1.0,
    "kbit": 1e3,
    "mbit": 1e6,
    "gbit": 1e9,
    "tbit": 1e12,
    "kibit": 2.0**10,
    "mibit": 2.0**20,
    "gibit": 2.0**30,
    "tibit": 2.0**40,
    "bps": 8.0,
    "kbps": 8e3,
    "mbps": 8e6,
    "gbps": 8e9,
    "tbps": 8e12,
    "kibps": 8 * 2.0**10,
    "mibps": 8 * 2.0**20,
    "gibps": 8 * 2.0**30,
    "tibps": 8 * 2.0**40,
}
_TIME_UNITS = {"s": 1.0, "sec": 1.0, "secs": 1.0, "ms": 1e-3, "msec": 1e-3, "msecs": 1e-3}
_TIME_UNITS |= {"us": 1e-6, "usec": 1e-6, "usecs": 1e-6}
_SIZE_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "m": 2**20, "mb": 2**20, "g": 2**30}
_SIZE_UNITS |= {"gb": 2**30, "kbit": 2**10 // 8, "mbit": 2**20 // 8, "gbit": 2**30 // 8}
_NUMBER = re.compile(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z]*)\s*")


class ClusterError(RuntimeError):
    """A namespace or link command failed (the message carries the command and stderr)."""


def _parse(what: str, text, units: dict) -> float:
    m = _NUMBER.fullmatch(str(text))
    if m is None or m.group(2).lower() not in units or float(m.group(1)) <= 0:
        allowed = ", ".join(u for u in units if u) or "none"
        raise ValueError(f"{what}={text!r}: expected a positive number with a unit ({allowed})")
    return float(m.group(1)) * units[m.group(2).lower()]


def rate_bits(rate: str | int | float) -> float:
    """Bits per second of a tc rate (``"10mbit"``, ``"1gbit"``, ``"125kbps"`` = 1 Mbit/s).

    A plain number is taken as bits per second.
    """
    if isinstance(rate, int | float) and not isinstance(rate, bool):
        if rate > 0:
            return float(rate)
        raise ValueError(f"rate={rate!r}: expected > 0 bits/s")
    return _parse("rate", rate, _RATE_UNITS)


def _tc_rate(rate: str | int | float) -> str:
    """The rate as tc reads it (numbers, in bits/s, become ``"<n>bit"``)."""
    bits = rate_bits(rate)
    return "".join(rate.split()) if isinstance(rate, str) else f"{round(bits)}bit"


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


def _tc(ns: str, spec: str) -> None:
    """Run ``tc`` with the words of ``spec`` inside namespace ``ns``."""
    _in(ns, "tc", *spec.split())


def namespaces() -> list[str]:
    """The namespaces this module made (and did not remove yet)."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    names = [line.split()[0] for line in r.stdout.splitlines() if line.strip()]
    mine = re.compile(re.escape(PREFIX) + r"(sw|\d+)")
    return [n for n in names if mine.fullmatch(n)]


def down() -> None:
    """Remove every namespace (and with them every link) this module made."""
    for ns in namespaces():
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _check_nodes(nodes) -> None:
    if not (isinstance(nodes, int) and 2 <= nodes <= MAX_NODES):
        raise ValueError(f"nodes={nodes!r}: expected an int in 2..{MAX_NODES}")


def _build(nodes: int, shape) -> list[str]:
    """Namespaces on a bridge, addressed and up; ``shape(i, ns, port)`` then shapes node ``i``.

    Replaces a cluster left by an earlier call; removes everything it made if any step fails.
    """
    reason = unavailable()
    if reason:
        raise ClusterError(f"emulated cluster unavailable: {reason}")
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
            shape(i, ns, port)
    except BaseException:
        down()
        raise
    return [addr(i) for i in range(nodes)]


def up(nodes: int, rate: str, latency: str = "50ms", burst: str = "256kb") -> list[str]:
    """Build ``nodes`` namespaces on a bridge, every link shaped to ``rate`` both ways.

    Returns the node addresses. Replaces a cluster left by an earlier call.
    """
    _check_nodes(nodes)

    def tbf(i: int, ns: str, port: str) -> None:
        for where, dev in ((ns, IFACE), (_ns("sw"), port)):  # shape both directions
            _tc(where, f"qdisc add dev {dev} root tbf rate {rate} burst {burst} latency {latency}")

    return _build(nodes, tbf)


def _check_matrix(rates) -> list[list[str | None]]:
    """``rates`` as a square list of tc rate strings (None off the shaped pairs), validated."""
    try:
        rows = [list(row) for row in rates]
    except TypeError:
        raise ValueError("rates: expected a square matrix (a list of rows)") from None
    _check_nodes(len(rows))
    out = []
    for i, row in enumerate(rows):
        if len(row) != len(rows):
            raise ValueError(f"rates[{i}] has {len(row)} entries; expected {len(rows)}")
        cells = []
        for j, r in enumerate(row):
            if i == j or r is None:
                cells.append(None)  # a node's own traffic never leaves it
                continue
            try:
                cells.append(_tc_rate(r))
            except ValueError as e:
                raise ValueError(f"rates[{i}][{j}]: {e}") from None
        out.append(cells)
    return out


def _htb(ns: str, targets: dict[int, str], latency_s: float, burst: str | None) -> None:
    """Shape node ``ns``'s egress: one HTB class (and a bounded FIFO) per destination."""
    if not targets:
        return
    # HTB queues a GSO super-packet whole: keep it to ~2 ms of the slowest pair, well under
    # that pair's FIFO limit, or a slow pair drops its 64 KB packets over and over
    slowest = min(rate_bits(r) for r in targets.values())
    gso = int(min(max(slowest / 8 * 2e-3, FRAME_BYTES), 65536))
    _in(ns, "ip", "link", "set", IFACE, "gso_max_size", str(gso))
    try:  # no "default": unclassified packets (unshaped pairs, ARP) skip the classes
        _tc(ns, f"qdisc add dev {IFACE} root handle 1: htb")
    except ClusterError as e:
        raise ClusterError(f"a rate matrix needs the kernel's htb qdisc (sch_htb): {e}") from e
    for j, rate in sorted(targets.items()):
        bps = rate_bits(rate) / 8
        # explicit bucket (default 1 ms of the pair's bytes, at least two frames) so the FIFO
        # limit below counts the bucket the class really has
        bucket = _parse("burst", burst, _SIZE_UNITS) if burst else max(bps * 1e-3, 2 * FRAME_BYTES)
        limit = max(int(bps * latency_s + bucket), 4 * FRAME_BYTES)
        cls = f"1:{j + 1:x}"
        # quantum only splits spare rate among siblings; with ceil = rate there is none
        htb = f"htb rate {rate} ceil {rate} quantum {FRAME_BYTES}"
        htb += f" burst {int(bucket)}b cburst {int(bucket)}b"
        match = f"u32 match ip dst {addr(j)}/32 flowid {cls}"
        _tc(ns, f"class add dev {IFACE} parent 1: classid {cls} {htb}")
        _tc(ns, f"qdisc add dev {IFACE} parent {cls} handle {0x100 + j:x}: bfifo limit {limit}")
        _tc(ns, f"filter add dev {IFACE} parent 1: protocol ip prio 1 {match}")


def up_matrix(
    rates: Sequence[Sequence[Rate]], latency: str = "50ms", burst: str | None = None
) -> list[str]:
    """Build ``len(rates)`` nodes where node ``i`` sends to node ``j`` at ``rates[i][j]``.

    ``rates[i][j]`` is a tc rate (``"10mbit"``, ``"1gbit"``; a number is bits/s) or None for
    an unshaped pair; the diagonal is ignored. ``latency`` bounds the time a packet waits in a
    pair's queue (its FIFO holds ``rate x latency + burst`` bytes; more is dropped and TCP
    backs off, as behind a real bottleneck). ``burst`` is HTB's bucket (default: 1 ms of the
    pair's bytes, at least two frames). Returns the node addresses; replaces a cluster left by
    an earlier call and removes what it built if a step fails.
    """
    matrix = _check_matrix(rates)
    latency_s = _parse("latency", latency, _TIME_UNITS)
    if burst is not None:
        _parse("burst", burst, _SIZE_UNITS)

    def shape(i: int, ns: str, port: str) -> None:
        targets = {j: r for j, r in enumerate(matrix[i]) if r is not None}
        _htb(ns, targets, latency_s, burst)

    return _build(len(matrix), shape)


def site_matrix(
    site_sizes: Sequence[int], intra_rate: Rate, inter_rates: Rate | Sequence[Sequence[Rate]]
) -> list[list[Rate]]:
    """The pair-rate matrix of nodes grouped in sites (nodes numbered site by site).

    Nodes of one site talk at ``intra_rate``; a node of site ``s`` sends to a node of site
    ``t`` at ``inter_rates[s][t]``, or at ``inter_rates`` itself when it is one rate for every
    pair of sites. None leaves those pairs unshaped.
    """
    sizes = list(site_sizes)
    if not sizes or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in sizes):
        raise ValueError(f"site_sizes={site_sizes!r}: expected a list of ints >= 1")
    _check_nodes(sum(sizes))
    if isinstance(inter_rates, str | int | float) or inter_rates is None:
        inter = [[inter_rates] * len(sizes) for _ in sizes]
    else:
        inter = [list(row) for row in inter_rates]
        if len(inter) != len(sizes) or any(len(row) != len(sizes) for row in inter):
            raise ValueError(
                f"inter_rates: expected one rate or a {len(sizes)}x{len(sizes)} matrix "
                f"(one row and column per site)"
            )
    site = [s for s, n in enumerate(sizes) for _ in range(n)]
    return [
        [intra_rate if site[i] == site[j] else inter[site[i]][site[j]] for j in range(len(site))]
        for i in range(len(site))
    ]


def up_sites(
    site_sizes: Sequence[int],
    intra_rate: Rate,
    inter_rates: Rate | Sequence[Sequence[Rate]],
    latency: str = "50ms",
    burst: str | None = None,
) -> list[str]:
    """:func:`up_matrix` of :func:`site_matrix`: e.g. ``up_sites([2, 2], "1gbit", "10mbit")``
    is two sites of two nodes each (nodes 0-1 and 2-3), 1 Gbit/s inside a site and 10 Mbit/s
    between them."""
    return up_matrix(site_matrix(site_sizes, intra_rate, inter_rates), latency, burst)


def node_command(i: int, cmd: Sequence[str], env: dict | None = None) -> list[str]:
    """``cmd`` wrapped to run inside node ``i`` (with GLOO_SOCKET_IFNAME and ``env``)."""
    extra = {"GLOO_SOCKET_IFNAME": IFACE, **(env or {})}
    return ["ip", "netns", "exec", _ns(i), "env", *[f"{k}={v}" for k, v in extra.items()], *cmd]


USAGE = (
    "usage: emulated_cluster.py up N RATE [LATENCY] | up-matrix JSON [LATENCY]"
    " | up-sites SIZES INTRA INTER [LATENCY] | addr I | exec I -- CMD... | down | check\n"
    '  JSON: [[null, "20mbit", ...], ...], rates[i][j] from node i to node j (null: unshaped)\n'
    "  SIZES: nodes per site, e.g. 2,2; INTER: one rate or a JSON site-by-site matrix"
)


def _json_or_rate(text: str):
    return json.loads(text) if text.lstrip()[:1] in ("[", "n") else text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print(USAGE, file=sys.stderr)
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
    try:
        if op == "up-matrix" and len(argv) in (2, 3):
            addrs = up_matrix(json.loads(argv[1]), *(argv[2:3]))
            print(f"emulated cluster: {len(addrs)} nodes, rates {argv[1]}: {' '.join(addrs)}")
            return 0
        if op == "up-sites" and len(argv) in (4, 5):
            sizes = [int(n) for n in argv[1].strip("[]").split(",")]
            inter = _json_or_rate(argv[3])
            addrs = up_sites(sizes, _json_or_rate(argv[2]), inter, *(argv[4:5]))
            print(f"emulated cluster: sites of {sizes} nodes: {' '.join(addrs)}")
            return 0
    except ValueError as e:  # bad input (json.JSONDecodeError is one too)
        print(f"emulated cluster: {e}", file=sys.stderr)
        return 2
    if op == "down" and len(argv) == 1:
        down()
        return 0
    if op == "exec" and len(argv) >= 3:
        rest = argv[2:]
        if rest[0] == "--":
            rest = rest[1:]
        return subprocess.call(node_command(int(argv[1]), rest))
    print(USAGE, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
