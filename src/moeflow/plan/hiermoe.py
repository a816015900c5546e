"""HierMoE level choice: message sizes after hierarchical token deduplication, and d*.

HierMoE (hierarchical token deduplication and expert swap): in a topology whose level-i
groups are consecutive blocks of ``U[i]`` ranks (``U[0] = 1`` the rank itself, the last
entry the whole EP group; the paper's 32-GPU cluster is ``U = [1, 4, 8, 16, 32]``), a
token routed to several experts under one level-d group crosses the link into that group
once and is copied to its experts after crossing.

The schedule that realises "dedup at level d" (the one ``moeflow.parallel.dedup`` runs):

* hop 1 (into the level-d group): source rank s sends one row per (token, level-d group g
  holding any of the token's experts) to the relay ``g*U[d] + s % U[d]``, the rank of g at
  s's position (for ``d = 0`` the relay is the expert's rank: a flat all-to-all with one
  row per (token, destination rank));
* hop 2 (inside the group, ``d > 0`` only): the relay sends one row per (token,
  destination rank) to the ranks of g that own the token's experts.

Combine is the mirror image with partial weighted sums, so it carries the same rows.

Message sizes (HierMoE, Eq. 4-5) are the deduplicated counts
``p[j] = Σ_tokens OR(routing mask over the experts of group j)``, split per link level: a
row from rank a to rank b travels the link of the smallest level whose group holds both.
The time of a hop follows the α-β model of Eq. 1 (``t = α + n·β`` with n the largest
message a rank sends on that link); a hop that uses several link levels at once takes as
long as its slowest level. ``t_d`` (Eq. 3) is the sum over the hops of level d's schedule,
and ``d* = argmin_d t_d`` (Eq. 6).

Pure Python, no torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from moeflow.errors import ConfigError, PlanError
from moeflow.validate import positive_int

# α (s) and β (s/byte) per link level, for planning without a measured PerfModel. Assumed
# figures of a GPU cluster: intra-node NVLink-class (~150 GB/s), inter-node 100 Gb/s IB.
DEFAULT_LINKS: dict[int, tuple[float, float]] = {
    1: (5e-6, 1 / 150e9),
    2: (20e-6, 1 / 12.5e9),
}


@dataclass(frozen=True)
class HopRows:
    """Rows one hop sends: ``rows[rank][link_level]`` (self-sends are not on any link)."""

    rows: tuple[dict[int, int], ...]

    def total(self, link: int) -> int:
        return sum(r.get(link, 0) for r in self.rows)

    def max_rank(self, link: int) -> int:
        return max((r.get(link, 0) for r in self.rows), default=0)

    def links(self) -> list[int]:
        return sorted({k for r in self.rows for k, v in r.items() if v})


def check_group_sizes(U: Sequence[int]) -> list[int]:
    """``U`` must start at 1, grow by whole multiples and end at the group size."""
    U = [positive_int(f"group_sizes[{i}]", u) for i, u in enumerate(U)]
    if len(U) < 2 or U[0] != 1 or any(b % a for a, b in zip(U, U[1:])) or U != sorted(U):
        raise ConfigError(
            "group_sizes",
            U,
            "a list starting at 1 (the rank), each entry a "
            "multiple of the previous, ending at the number of ranks, e.g. "
            "[1, 4, 8, 16, 32]",
        )
    return U


def link_level(a: int, b: int, U: Sequence[int]) -> int:
    """Index of the smallest level whose group holds ranks a and b (0 when a == b)."""
    for i, u in enumerate(U):
        if a // u == b // u:
            return i
    raise PlanError(f"ranks {a} and {b} share no group of sizes {list(U)}")


def contiguous_owner(num_experts: int, num_ranks: int) -> list[int]:
    """The default placement: rank p owns experts ``[p*E/P, (p+1)*E/P)``."""
    if num_experts % num_ranks:
        raise ConfigError("num_experts", num_experts, f"a multiple of the {num_ranks} ranks")
    per = num_experts // num_ranks
    return [e // per for e in range(num_experts)]


def dedup_hops(
    assignments: Sequence[Sequence[Iterable[int]]],
    owner: Sequence[int],
    U: Sequence[int],
    level: int,
) -> list[HopRows]:
    """Rows per hop, rank and link for dedup at ``level`` (HierMoE, Eq. 4-5).

    ``assignments[s][t]`` are the experts token t of source rank s is routed to (after any
    capacity drop); ``owner[e]`` is the rank of expert e. One direction (dispatch); combine
    sends the same rows back.
    """
    U = check_group_sizes(U)
    P = U[-1]
    if len(assignments) != P:
        raise ConfigError("assignments", f"{len(assignments)} ranks", f"{P} (= group_sizes[-1])")
    if not (isinstance(level, int) and 0 <= level < len(U) - 1):
        raise ConfigError("level", level, f"an int in [0, {len(U) - 1})")
    u = U[level]
    hop1 = [dict() for _ in range(P)]
    hop2 = [dict() for _ in range(P)]
    for s, tokens in enumerate(assignments):
        for experts in tokens:
            ranks = {owner[e] for e in experts}
            for g in {r // u for r in ranks}:  # one row per level-d group
                relay = g * u + s % u
                if relay != s:
                    lk = link_level(s, relay, U)
                    hop1[s][lk] = hop1[s].get(lk, 0) + 1
            if u == 1:
                continue
            for r in ranks:  # one row per destination rank
                relay = (r // u) * u + s % u
                if relay != r:
                    lk = link_level(relay, r, U)
                    hop2[relay][lk] = hop2[relay].get(lk, 0) + 1
    hops = [HopRows(tuple(hop1))]
    if u > 1:
        hops.append(HopRows(tuple(hop2)))
    return hops


def flat_hops(
    assignments: Sequence[Sequence[Iterable[int]]], owner: Sequence[int], U: Sequence[int]
) -> list[HopRows]:
    """Rows of the plain all-to-all (one row per assignment, no dedup): the baseline."""
    U = check_group_sizes(U)
    rows = [dict() for _ in range(U[-1])]
    for s, tokens in enumerate(assignments):
        for experts in tokens:
            for e in experts:
                r = owner[e]
                if r != s:
                    lk = link_level(s, r, U)
                    rows[s][lk] = rows[s].get(lk, 0) + 1
    return [HopRows(tuple(rows))]


def level_bytes(hops: Sequence[HopRows], row_bytes: int) -> dict[int, int]:
    """Bytes sent on each link level, summed over ranks and hops (one direction)."""
    out: dict[int, int] = {}
    for h in hops:
        for lk in h.links():
            out[lk] = out.get(lk, 0) + h.total(lk) * row_bytes
    return out


def hop_time(hop: HopRows, row_bytes: int, links: Mapping[int, tuple[float, float]]) -> float:
    """α + n·β of the slowest link level the hop uses (HierMoE, Eq. 1; n the largest message)."""
    t = 0.0
    for lk in hop.links():
        if lk not in links:
            raise ConfigError("links", sorted(links), f"(alpha, beta) for link level {lk}")
        a, b = links[lk]
        t = max(t, a + hop.max_rank(lk) * row_bytes * b)
    return t


def level_time(
    hops: Sequence[HopRows], row_bytes: int, links: Mapping[int, tuple[float, float]] | None = None
) -> float:
    """``t_d`` (HierMoE, Eq. 3): the hops of the level-d schedule run one after the other."""
    links = DEFAULT_LINKS if links is None else links
    return sum(hop_time(h, row_bytes, links) for h in hops)


def best_level(times: Sequence[float]) -> int:
    """``d* = argmin_d t_d`` (HierMoE, Eq. 6); ties go to the lower level (fewer hops)."""
    if not times:
        raise PlanError("no level to choose from")
    return min(range(len(times)), key=lambda d: (times[d], d))


def choose_level(assignments, owner, U, row_bytes: int, links=None) -> tuple[int, list[float]]:
    """``(d*, [t_0, t_1, ...])`` for the routing of one batch."""
    U = check_group_sizes(U)
    times = [
        level_time(dedup_hops(assignments, owner, U, d), row_bytes, links)
        for d in range(len(U) - 1)
    ]
    return best_level(times), times


def duplication_rate(assignments, owner, U, level: int) -> float:
    """Fraction of the flat all-to-all's remote rows (all link levels together) that dedup
    at ``level`` saves; negative when the relay hop adds more rows inside the groups than
    the first hop removes (the level choice weighs the links, this count does not)."""
    flat = sum(level_bytes(flat_hops(assignments, owner, U), 1).values())
    ded = level_bytes(dedup_hops(assignments, owner, U, level), 1)
    return 0.0 if flat == 0 else 1.0 - sum(ded.values()) / flat


# -- expert swap ---------------------------------------------------------------------------
def smooth_max(xs: Sequence[float], gamma: float = 10.0) -> float:
    """``max(x)·(Σ (x_i / max x)^γ)^(1/γ)`` (HierMoE expert swap): a max that still moves
    when a rank other than the busiest one gets lighter, so the search sees every gain."""
    m = max(xs, default=0.0)
    if m <= 0:
        return 0.0
    return m * sum((x / m) ** gamma for x in xs) ** (1.0 / gamma)


class _RankRows:
    """Rows of the first hop of dedup at the level of group size u: ``rows[s][q]`` = tokens
    of source s with an expert in group q (u = 1: on rank q), kept up to date under expert
    swaps (the incremental update)."""

    def __init__(self, assignments, owner, P: int, u: int = 1):
        self.P, self.u = P, u
        self.owner = list(owner)
        self.cnt = []  # cnt[s][t][q]: experts of token t in group q
        self.rows = [[0] * (P // u) for _ in range(P)]
        self.users: dict[int, list[tuple[int, int]]] = {}
        for s, tokens in enumerate(assignments):
            per = []
            for t, experts in enumerate(tokens):
                c: dict[int, int] = {}
                for e in experts:
                    q = self.owner[e] // u
                    c[q] = c.get(q, 0) + 1
                    self.users.setdefault(e, []).append((s, t))
                for q in c:
                    self.rows[s][q] += 1
                per.append(c)
            self.cnt.append(per)

    def delta(self, r: int, c: int) -> dict[tuple[int, int], int]:
        """Change of ``rows[s][q]`` if experts r and c swap ranks (only their tokens move)."""
        a, b = self.owner[r] // self.u, self.owner[c] // self.u
        if a == b:
            return {}
        out: dict[tuple[int, int], int] = {}
        moves: dict[tuple[int, int], list[int]] = {}
        for e, src in ((r, a), (c, b)):
            for s, t in self.users.get(e, ()):
                m = moves.setdefault((s, t), [0, 0])  # net change on a, on b
                m[0] += -1 if src == a else 1
                m[1] += -1 if src == b else 1
        for (s, t), (da, db) in moves.items():
            cnt = self.cnt[s][t]
            for q, d in ((a, da), (b, db)):
                before, after = cnt.get(q, 0) > 0, cnt.get(q, 0) + d > 0
                if before != after:
                    out[(s, q)] = out.get((s, q), 0) + (1 if after else -1)
        return out

    def apply(self, r: int, c: int) -> None:
        for (s, q), d in self.delta(r, c).items():
            self.rows[s][q] += d
        a, b = self.owner[r] // self.u, self.owner[c] // self.u
        for e, src, dst in ((r, a, b), (c, b, a)):
            if a == b:
                break
            for s, t in self.users.get(e, ()):
                cnt = self.cnt[s][t]
                cnt[src] -= 1
                cnt[dst] = cnt.get(dst, 0) + 1
        self.owner[r], self.owner[c] = self.owner[c], self.owner[r]


def _relay(s: int, q: int, u: int) -> int:
    """The rank of group q (size u) at sender s's position: where hop 1 goes."""
    return q * u + s % u


def _per_link(rows, U, u: int = 1) -> dict[int, list[int]]:
    """Rows each sender puts on each link level in hop 1 (self-rows on none)."""
    P = len(rows)
    per = {lk: [0] * P for lk in range(1, len(U))}
    for s in range(P):
        for q in range(len(rows[s])):
            dst = _relay(s, q, u)
            if dst != s and rows[s][q]:
                per[link_level(s, dst, U)][s] += rows[s][q]
    return per


def _swap_time(per, row_bytes: int, links, gamma: float) -> float:
    """Predicted time of the level-0 dedup all-to-all with the smooth max over senders."""
    t = 0.0
    for lk, xs in per.items():
        if any(xs):
            a, b = links[lk]
            t = max(t, a + b * row_bytes * smooth_max(xs, gamma))
    return t


def swap_step(
    assignments,
    owner,
    U,
    row_bytes: int,
    links=None,
    gamma: float = 10.0,
    state: _RankRows | None = None,
    level: int = 0,
):
    """One HierMoE swap: the pair of experts (r, c) on different ranks whose exchange most
    lowers the predicted all-to-all time (smooth max, γ = 10), or None if none helps.

    Returns ``(pair, new_owner, predicted_time, state)``; pass ``state`` back to the next
    step of the same batch to reuse the incremental row counts. Each candidate is scored
    from the rows of the two experts' tokens only (the incremental update: the per-sender
    link loads change only where those rows change), not from a recount of the batch.
    ``level`` d scores hop 1 of dedup at level d (the rows into each level-d group; swaps
    inside one group do not change it).
    """
    U = check_group_sizes(U)
    links = DEFAULT_LINKS if links is None else links
    P, E = U[-1], len(owner)
    u = U[level]
    st = state if state is not None else _RankRows(assignments, owner, P, u)
    base = _per_link(st.rows, U, u)
    best = (_swap_time(base, row_bytes, links, gamma), None)
    for r in range(E):
        for c in range(r + 1, E):
            if st.owner[r] == st.owner[c]:
                continue
            d = st.delta(r, c)
            if not d:
                continue
            per = {lk: xs[:] for lk, xs in base.items()}
            for (s, q), v in d.items():
                dst = _relay(s, q, u)
                if dst != s:
                    per[link_level(s, dst, U)][s] += v
            t = _swap_time(per, row_bytes, links, gamma)
            if t < best[0] - 1e-15:
                best = (t, (r, c))
    if best[1] is None:
        return None, list(st.owner), best[0], st
    st.apply(*best[1])
    return best[1], list(st.owner), best[0], st


def rank_rows(assignments, owner, P: int) -> list[list[int]]:
    """``rows[s][q]`` of the level-0 dedup all-to-all, counted from scratch."""
    return _RankRows(assignments, owner, P).rows


# -- planning from earlier batches: the level (or none), the placement, the swap's cost ----
#: bytes the dedup dispatcher all-gathers per assignment (token and expert as int64, the
#: combine weight as fp32) and all-reduces per assignment in backward (the weight gradient)
ROUTING_BYTES = 20
WGRAD_BYTES = 4
#: a step sends a schedule's rows four times: dispatch and combine, forward and backward
PASSES = 4


def _widest(links) -> tuple[float, float]:
    return links[max(links)]


def dedup_overhead(assignments, U, links) -> float:
    """What the dedup dispatcher pays per step that the plain all-to-all does not (s): the
    all-gather of every assignment's (token, expert, weight) and of the sizes before it, and
    the all-reduce of the combine weights' gradient (its payload on the widest link)."""
    U = check_group_sizes(U)
    P = U[-1]
    rows = []
    for s in range(P):
        n = sum(len(e) for e in assignments[s])
        per: dict[int, int] = {}
        for q in range(P):
            if q != s:
                lk = link_level(s, q, U)
                per[lk] = per.get(lk, 0) + n
        rows.append(per)
    a, b = _widest(links)
    total = sum(len(e) for tokens in assignments for e in tokens)
    gather = hop_time(HopRows(tuple(rows)), ROUTING_BYTES, links) if P > 1 else 0.0
    return gather + (a if P > 1 else 0.0) + (a + total * WGRAD_BYTES * b if P > 1 else 0.0)


def swap_time(old_owner, new_owner, U, expert_bytes: float, links) -> float:
    """Time of the point-to-point swap from ``old_owner`` to ``new_owner``: every expert
    whose owner changes travels once (``expert_bytes``: its weights, gradients and
    optimizer state); the α-β time of the largest per-rank message on the slowest link."""
    U = check_group_sizes(U)
    rows = [dict() for _ in range(U[-1])]
    for a, b in zip(old_owner, new_owner):
        if a != b:
            lk = link_level(a, b, U)
            rows[a][lk] = rows[a].get(lk, 0) + 1
    return hop_time(HopRows(tuple(rows)), expert_bytes, links)


@dataclass(frozen=True)
class DedupPlan:
    """The plan :func:`plan_dedup` makes from earlier batches.

    ``level``: the dedup level (index into ``U``'s groups) or None, no dedup (the plain
    all-to-all pays less). ``owner``: the placement to run (the input one when no swap
    pays). ``times_s``: the predicted communication time of one step of each option on the
    check batch, the swap's time spread over ``horizon`` steps included, by
    :func:`level_label` (``"none"``, ``"rank"``, ``"node"``). ``moved``: experts whose
    owner changes; ``swap_s`` the swap's predicted time."""

    level: int | None
    owner: tuple[int, ...]
    times_s: dict
    moved: int
    swap_s: float

    @property
    def level_name(self) -> str:
        return level_label(self.level)

    def dispatcher(self) -> tuple[str, dict | None]:
        """``(dispatcher, dispatcher_options)`` for :class:`moeflow.parallel.ExpertParallel`:
        ``("a2a", None)`` for no dedup, else ``("dedup", {"level": level})`` (then
        ``apply_placement(owner)``)."""
        return ("a2a", None) if self.level is None else ("dedup", {"level": self.level})


def level_label(d: int | None) -> str:
    """``"none"`` (no dedup), ``"rank"``, ``"node"``, then ``"level d"`` for deeper trees."""
    return "none" if d is None else ("rank", "node")[d] if d < 2 else f"level {d}"


def plan_dedup(
    history: Sequence,
    owner: Sequence[int],
    U: Sequence[int],
    row_bytes: int,
    links=None,
    *,
    expert_bytes: float = 0.0,
    horizon: int = 100,
    max_swaps: int = 8,
    gamma: float = 10.0,
) -> DedupPlan:
    """Dedup level (or none) and expert placement from the routing of earlier batches.

    ``history``: the routing of earlier batches, each ``[rank][token] -> experts`` of the
    whole group. The swap search (:func:`swap_step`, up to ``max_swaps`` swaps per level)
    runs on all batches but the last; the last one checks: every option is priced on it
    (:data:`PASSES` x ``t_d`` of the level's hops, plus :func:`dedup_overhead`, plus the
    swap's :func:`swap_time` over ``horizon`` steps), and a swap prefix is kept only if it
    pays there. With one batch, it is both searched and checked. The plain all-to-all
    (``"none"``) pays ``PASSES`` x the flat rows plus one α for its count exchange. The
    batch the plan will run on is never an input.
    """
    if not history:
        raise ConfigError("history", "[]", "the routing of at least one earlier batch")
    U = check_group_sizes(U)
    links = DEFAULT_LINKS if links is None else links
    P = U[-1]
    owner = list(owner)
    search = history[:-1] or history
    check = history[-1]
    pool = [[t for batch in search for t in batch[s]] for s in range(P)]
    overhead = dedup_overhead(check, U, links)
    times = {"none": PASSES * level_time(flat_hops(check, owner, U), row_bytes, links)}
    times["none"] += _widest(links)[0] if P > 1 else 0.0
    best: tuple = (times["none"], None, owner, 0.0)
    for d in range(len(U) - 1):
        cands, cur, state = [owner], owner, None
        for _ in range(max_swaps):
            pair, cur, _, state = swap_step(pool, cur, U, row_bytes, links, gamma, state, d)
            if pair is None:
                break
            cands.append(cur)
        scored = []
        for cand in cands:
            sw = swap_time(owner, cand, U, expert_bytes, links) if cand != owner else 0.0
            t = PASSES * level_time(dedup_hops(check, cand, U, d), row_bytes, links)
            scored.append((t + overhead + sw / horizon, cand, sw))
        t, cand, sw = min(scored, key=lambda x: x[0])  # ties: the fewest swaps
        times[level_label(d)] = t
        if t < best[0]:
            best = (t, d, cand, sw)
    _, level, new, sw = best
    moved = sum(a != b for a, b in zip(owner, new))
    return DedupPlan(level=level, owner=tuple(new), times_s=times, moved=moved, swap_s=sw)


# -- planning without a batch (``moeflow plan --method hiermoe``) -----------------------------
def synthetic_routing(num_ranks: int, tokens: int, num_experts: int, top_k: int, seed: int) -> list:
    """Uniform top-k routing of ``tokens`` tokens on each rank (a stand-in for a batch)."""
    import random

    rng = random.Random(seed)
    return [
        [rng.sample(range(num_experts), top_k) for _ in range(tokens)] for _ in range(num_ranks)
    ]


def links_of(cluster) -> dict[int, tuple[float, float]]:
    """α-β per link level from a :class:`moeflow.clusters.ClusterSpec` (intra, inter)."""
    intra, inter = cluster.links[0], cluster.links[-1]
    return {
        1: (intra.latency_us * 1e-6, 1 / (intra.bandwidth_GBps * 1e9)),
        2: (inter.latency_us * 1e-6, 1 / (inter.bandwidth_GBps * 1e9)),
    }


def plan_levels(
    *,
    num_experts: int,
    top_k: int,
    hidden: int,
    bytes_per_elem: int,
    ranks_per_node: int,
    num_ranks: int,
    tokens: int,
    layers: int,
    links,
    sample_tokens: int = 64,
) -> list[dict]:
    """The level per layer from a synthetic batch of each layer (seeded by layer): d*
    (HierMoE Eq. 6) among the dedup levels, or ``"none"`` where the plain all-to-all costs
    less per step than dedup with its overhead (:func:`plan_dedup`, no swap).

    ``tokens`` is tokens per rank; the message sizes of a sample of ``sample_tokens`` tokens
    are scaled up to it (the dedup counts are sums over tokens).
    """
    if num_experts % num_ranks:
        raise ConfigError(
            "num_experts",
            num_experts,
            f"a multiple of the {num_ranks} EP ranks "
            "(choose --esp so that the EP size divides the experts)",
        )
    U = check_group_sizes(
        [1, ranks_per_node, num_ranks] if 1 < ranks_per_node < num_ranks else [1, num_ranks]
    )
    owner = contiguous_owner(num_experts, num_ranks)
    n = min(tokens, sample_tokens)
    row = hidden * bytes_per_elem * tokens / n
    out = []
    for i in range(layers):
        routes = synthetic_routing(num_ranks, n, num_experts, top_k, seed=i)
        _, times = choose_level(routes, owner, U, row, links)
        flat = level_time(flat_hops(routes, owner, U), row, links)
        plan = plan_dedup([routes], owner, U, row, links, max_swaps=0)
        out.append(
            {
                "layer": i,
                "level": plan.level_name,
                "t_levels_ms": [t * 1e3 for t in times],
                "t_flat_ms": flat * 1e3,
                "t_step_ms": {k: v * 1e3 for k, v in plan.times_s.items()},
            }
        )
    return out
