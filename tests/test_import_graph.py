"""The package's import graph: no cycles, and the layering rules of the architecture.

The graph is built statically from the source: every ``import`` / ``from ... import``
statement counts, including those inside functions (a lazy import still ties the two modules
together). An edge goes to the most specific module the statement names: ``from moeflow.comm
import topology`` points at ``moeflow.comm.topology``, ``from moeflow.comm import Topology``
at the package ``moeflow.comm``. Implicit parent-package imports are not edges.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "moeflow"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest prefix of dotted ``name`` that is a module of the package."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in known:
            return cand
        parts.pop()
    return None


def _imports(module: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """``(imported module, kind)`` for every import statement of ``path``; kind is the
    raw dotted name, so a failure message can show which statement made the edge."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # "from pkg import sub" names the submodule; "from pkg import Name" the package
            names = [f"{stem}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] != PACKAGE:
                continue
            target = _resolve(name, known)
            if target is not None and target != module:
                out.append((target, name))
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> modules it imports (static, within the package)."""
    known = _modules()
    graph: dict[str, set[str]] = {m: set() for m in known}
    for m, p in known.items():
        graph[m].update(t for t, _ in _imports(m, p, known))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _third_party(path: Path) -> set[str]:
    """Every dotted non-package name that ``path`` imports (any nesting level)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return {n for n in out if n.split(".")[0] != PACKAGE}


def test_cycle_finder_sees_a_cycle_and_a_lazy_import(tmp_path):
    # the checker itself: a function-level import closes a cycle, a one-way chain does not
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from moeflow.perf.presets import perf_preset\n")
    known = {"moeflow.perf.presets": mod, "moeflow.perf": mod, "moeflow.x": mod}
    assert _imports("moeflow.x", mod, known) == [
        ("moeflow.perf.presets", "moeflow.perf.presets.perf_preset")
    ]


def test_graph_covers_the_package():
    g = import_graph()
    assert "moeflow.perf.cost" in g and "moeflow.parallel.expert_parallel" in g
    assert "moeflow.comm.collectives" in g["moeflow.parallel.expert_parallel"]
    # the third-party scan sees what the layering tests look for
    known = _modules()
    assert "torch.distributed" in _third_party(known["moeflow.parallel.expert_parallel"])
    assert "torch" in _third_party(known["moeflow.layer.routers"])


def test_package_has_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _reachable(start: list[str], graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph[m])
    return seen


def _in(subpackage: str, known) -> list[str]:
    return [
        m
        for m in known
        if m == f"{PACKAGE}.{subpackage}" or m.startswith(f"{PACKAGE}.{subpackage}.")
    ]


@pytest.mark.parametrize("subpackage", ["plan", "sim"])
def test_planners_and_simulator_import_no_torch(subpackage):
    # pure planning must run where torch is not installed (a laptop planning 2048 GPUs).
    # Statically: no import statement of torch in the subpackage, lazy ones included.
    known = _modules()
    mods = _in(subpackage, known)
    assert mods
    offenders = sorted(
        (m, n) for m in mods for n in _third_party(known[m]) if n.split(".")[0] == "torch"
    )
    assert offenders == []


def test_planners_and_simulator_load_without_torch():
    # At run time, transitively: importing every plan/ and sim/ module loads no torch.
    known = _modules()
    mods = _in("plan", known) + _in("sim", known)
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in mods)
        + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:5])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("subpackage", ["layer", "models"])
def test_single_device_packages_import_no_torch_distributed(subpackage):
    # layer/ and models/ are single-device semantics; distribution lives in comm/ and runtime/
    g, known = import_graph(), _modules()
    seen = _reachable(_in(subpackage, known), g)
    offenders = sorted(
        (m, n) for m in seen for n in _third_party(known[m]) if n.startswith("torch.distributed")
    )
    assert offenders == []


#: The layer order, lowest first (notes/DESIGN.md explains each). A module may import modules
#: of its own layer entry and of lower ones, never of a higher one; no exception list.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("_deps", "_moved", "validate", "files"),
    ("config", "clusters", "progress"),
    ("kernels",),
    ("layer",),
    ("models",),
    ("compress",),
    ("checkpoint",),
    ("integrations",),
    ("perf",),
    ("comm",),
    ("launch",),
    ("sim",),
    ("plan",),
    ("parallel",),
    ("serving", "geo"),
    ("apps",),
    ("cli",),
    ("runtime", "bench"),  # deprecated aliases of moved names: nothing may import them
]


def _part(module: str) -> str:
    """The layer entry of a module: its subpackage, or its own name for a base module."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(module: str) -> int:
    part = _part(module)
    for i, names in enumerate(LAYERS):
        if part in names:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS: place it")


def test_every_module_has_a_layer():
    for m in import_graph():
        if m != PACKAGE:
            _rank(m)


#: entries that share a layer without importing each other
PEERS = {("serving", "geo"), ("runtime", "bench")}


def _runs_up(m: str, t: str) -> bool:
    rm, rt = _rank(m), _rank(t)
    if rt != rm:
        return rt > rm
    return _part(m) != _part(t) and tuple(LAYERS[rm]) in PEERS


def test_imports_point_down_the_layers():
    # the package root is the facade (lazy names only); everything else keeps the order
    g = import_graph()
    up = sorted(
        (m, t)
        for m, targets in g.items()
        if m != PACKAGE
        for t in targets
        if t != PACKAGE and _runs_up(m, t)
    )
    assert up == [], "imports that run up the layers: " + "; ".join(f"{a} -> {b}" for a, b in up)


def test_layer_check_catches_an_upward_lazy_import(tmp_path):
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from moeflow.parallel.dispatch import make_dispatcher\n")
    known = {"moeflow.parallel.dispatch": mod, "moeflow.comm.x": mod}
    ((target, _),) = _imports("moeflow.comm.x", mod, known)
    assert _rank(target) > _rank("moeflow.comm.x")


def test_no_module_imports_the_deprecated_aliases():
    g = import_graph()
    users = sorted(
        (m, t)
        for m, targets in g.items()
        for t in targets
        if _part(t) in ("runtime", "bench") and _part(m) not in ("runtime", "bench")
    )
    assert users == []
