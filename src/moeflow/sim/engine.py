"""Task graph and discrete-event engine.

A :class:`TaskGraph` is a list of tasks; each has a name, a resource (a GPU's compute stream,
the intra-node link, the inter-node link, ...), a duration in ms and dependencies.

Semantics (what the papers' schedulers assume, and what a CUDA stream / NCCL communicator does):
  * each resource runs **one task at a time, in plan order** (the order tasks were added for
    that resource), never reordering;
  * a task starts when its dependencies are done **and** the previous task on its resource is
    done: ``start = max(end(deps), end(previous on resource))``;
  * ``resource=None`` means "no contention" (e.g. a fixed delay).

A cycle through dependencies and resource order is a deadlock and raises
:class:`moeflow.errors.PlanError` naming the stuck tasks.

Pure Python (matplotlib is imported only by :meth:`Timeline.to_png`).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from moeflow.errors import InputError, PlanError


@dataclass(frozen=True)
class Task:
    name: str
    resource: str | None
    duration: float
    deps: tuple[int, ...] = ()
    kind: str = ""


class TaskGraph:
    """Tasks on resources, in plan order. :meth:`add` returns the task's id."""

    def __init__(self) -> None:
        self.tasks: list[Task] = []
        self._names: dict[str, int] = {}

    def add(
        self,
        name: str,
        resource: str | None,
        duration: float,
        deps: Iterable[int | str] = (),
        kind: str = "",
    ) -> int:
        if name in self._names:
            raise InputError(f"task name {name!r} is used twice; names must be unique")
        if not (duration >= 0):
            raise InputError(f"task {name!r} has duration {duration!r}; it must be >= 0")
        dep_ids = []
        for d in deps:
            i = self._names.get(d) if isinstance(d, str) else d
            if i is None or not (0 <= i < len(self.tasks)):
                raise InputError(f"task {name!r} depends on unknown task {d!r}")
            dep_ids.append(i)
        self.tasks.append(Task(name, resource, float(duration), tuple(dep_ids), kind))
        self._names[name] = len(self.tasks) - 1
        return len(self.tasks) - 1

    def id(self, name: str) -> int:
        return self._names[name]

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def resources(self) -> list[str]:
        seen: dict[str, None] = {}
        for t in self.tasks:
            if t.resource is not None:
                seen.setdefault(t.resource, None)
        return list(seen)


@dataclass
class Timeline:
    """The result of :func:`simulate`: start/end per task, makespan, busy time, critical path."""

    graph: TaskGraph
    start: list[float]
    end: list[float]
    binding: list[int | None]  # the predecessor whose end released this task (None: time 0)
    makespan: float = 0.0
    busy: dict[str, float] = field(default_factory=dict)

    def critical_path(self) -> list[str]:
        """Names of the chain of tasks that bounds the makespan, first to last.

        Walk back from the task that ends last through the predecessor (dependency or previous
        task on the same resource) whose end released each task.
        """
        if not self.end:
            return []
        i: int | None = max(range(len(self.end)), key=lambda j: (self.end[j], -j))
        path = []
        while i is not None:
            path.append(self.graph.tasks[i].name)
            i = self.binding[i]
        return path[::-1]

    def utilization(self) -> dict[str, float]:
        return {r: (b / self.makespan if self.makespan > 0 else 0.0) for r, b in self.busy.items()}

    def task(self, name: str) -> tuple[float, float]:
        i = self.graph.id(name)
        return self.start[i], self.end[i]

    # ---- export -------------------------------------------------------------------------
    def chrome_trace(self) -> dict:
        """Chrome / Perfetto trace-event JSON (``ph: X`` complete events, microseconds)."""
        res = self.graph.resources
        tid = {r: i + 1 for i, r in enumerate(res)}
        events: list[dict] = [
            {"name": "process_name", "ph": "M", "pid": 0, "args": {"name": "moeflow.sim"}}
        ]
        for r, t in tid.items():
            events.append(
                {"name": "thread_name", "ph": "M", "pid": 0, "tid": t, "args": {"name": r}}
            )
        for i, task in enumerate(self.graph.tasks):
            events.append(
                {
                    "name": task.name,
                    "cat": task.kind or "task",
                    "ph": "X",
                    "pid": 0,
                    "tid": tid.get(task.resource, 0),
                    "ts": self.start[i] * 1e3,
                    "dur": task.duration * 1e3,
                    "args": {"resource": task.resource, "duration_ms": task.duration},
                }
            )
        return {
            "traceEvents": events,
            "displayTimeUnit": "ms",
            "otherData": {"makespan_ms": self.makespan},
        }

    def to_chrome_trace(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.chrome_trace()))

    def to_png(self, path: str | Path, title: str = "") -> None:
        """Gantt chart, one row per resource (matplotlib, imported here)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        res = self.graph.resources
        kinds = sorted({t.kind or "task" for t in self.graph.tasks})
        cmap = plt.get_cmap("tab10")
        color = {k: cmap(i % 10) for i, k in enumerate(kinds)}
        fig, ax = plt.subplots(figsize=(12, 0.6 * len(res) + 1.5))
        for row, r in enumerate(res):
            for i, t in enumerate(self.graph.tasks):
                if t.resource == r and t.duration > 0:
                    ax.broken_barh(
                        [(self.start[i], t.duration)],
                        (row - 0.4, 0.8),
                        facecolors=color[t.kind or "task"],
                        edgecolor="black",
                        linewidth=0.3,
                    )
        ax.set_yticks(range(len(res)))
        ax.set_yticklabels(res)
        ax.set_xlabel("time (ms)")
        ax.set_title(title or f"makespan {self.makespan:.3f} ms")
        handles = [plt.Rectangle((0, 0), 1, 1, color=color[k]) for k in kinds]
        ax.legend(handles, kinds, loc="upper right", fontsize=7, ncol=min(len(kinds), 6))
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def simulate(graph: TaskGraph) -> Timeline:
    """Run the event-driven engine (semantics in the module docstring)."""
    tasks = graph.tasks
    n = len(tasks)
    queues: dict[str | None, list[int]] = {}
    for i, t in enumerate(tasks):
        queues.setdefault(t.resource, []).append(i)
    head = {r: 0 for r in queues if r is not None}
    free_at = {r: 0.0 for r in head}
    last_on = {r: None for r in head}
    n_deps_left = [len(t.deps) for t in tasks]
    children: list[list[int]] = [[] for _ in range(n)]
    for i, t in enumerate(tasks):
        for d in t.deps:
            children[d].append(i)
    start = [0.0] * n
    end = [0.0] * n
    binding: list[int | None] = [None] * n
    ready_at = [0.0] * n  # max end of deps
    ready_by: list[int | None] = [None] * n
    running: dict[str, bool] = {r: False for r in head}
    started = [False] * n
    events: list[tuple[float, int, int]] = []  # (end time, seq, task)
    seq = 0
    done = 0

    def launch(i: int, now: float) -> None:
        nonlocal seq
        r = tasks[i].resource
        s = ready_at[i]
        b = ready_by[i]
        if r is not None and free_at[r] > s:
            s, b = free_at[r], last_on[r]
        s = max(s, now) if r is None else s
        start[i], end[i], binding[i] = s, s + tasks[i].duration, b
        started[i] = True
        if r is not None:
            running[r] = True
        heapq.heappush(events, (end[i], seq, i))
        seq += 1

    def try_resource(r: str, now: float) -> None:
        if running[r] or head[r] >= len(queues[r]):
            return
        i = queues[r][head[r]]
        if n_deps_left[i] == 0:
            head[r] += 1
            launch(i, now)

    for i in queues.get(None, []):
        if n_deps_left[i] == 0:
            launch(i, 0.0)
    for r in head:
        try_resource(r, 0.0)
    while events:
        now, _, i = heapq.heappop(events)
        done += 1
        r = tasks[i].resource
        touched = set()
        if r is not None:
            running[r] = False
            free_at[r] = end[i]
            last_on[r] = i
            touched.add(r)
        for c in children[i]:
            n_deps_left[c] -= 1
            if end[i] >= ready_at[c]:
                ready_at[c], ready_by[c] = end[i], i
            if n_deps_left[c] == 0:
                if tasks[c].resource is None:
                    launch(c, now)
                else:
                    touched.add(tasks[c].resource)
        for rr in touched:
            try_resource(rr, now)
    if done != n:
        stuck = [tasks[i].name for i in range(n) if not started[i]][:8]
        raise PlanError(
            f"deadlock: {n - done} of {n} tasks never started (dependencies and "
            f"resource order form a cycle); e.g. {stuck}"
        )
    busy: dict[str, float] = {r: 0.0 for r in head}
    for t in tasks:
        if t.resource is not None:
            busy[t.resource] += t.duration
    return Timeline(
        graph=graph,
        start=start,
        end=end,
        binding=binding,
        makespan=max(end) if end else 0.0,
        busy=busy,
    )


def makespan_of(graph: TaskGraph) -> float:
    return simulate(graph).makespan


def chain(
    graph: TaskGraph, names: Sequence[str], resource: str, durations: Sequence[float]
) -> list[int]:
    """Add tasks that each depend on the previous one (a convenience for tests and builders)."""
    ids: list[int] = []
    for nm, d in zip(names, durations):
        ids.append(graph.add(nm, resource, d, deps=ids[-1:]))
    return ids
