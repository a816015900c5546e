"""Structure of the expert-parallel engine: one pipeline and one autograd Function drive every
dispatcher (FSMoE's dispatch module as a description, not a runner), and no module of the
engine reaches into another's private members.

These are AST checks of the source, so a dispatcher that grows its own chunk pipeline or
backward again (as HierMoE's dedup once had) fails here before any rank is started.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PARALLEL = Path(__file__).resolve().parents[2] / "src" / "moeflow" / "parallel"


def _tree(name: str) -> ast.Module:
    return ast.parse((PARALLEL / name).read_text(), name)


def _dotted(node) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def _defines_a_dispatcher(tree: ast.Module) -> bool:
    from moeflow.parallel import DISPATCHER_CLASSES, TokenDispatcher

    names = {TokenDispatcher.__name__} | {c.__name__ for c in DISPATCHER_CLASSES.values()}
    return any(
        isinstance(n, ast.ClassDef) and any(_dotted(b).split(".")[-1] in names for b in n.bases)
        for n in ast.walk(tree)
    )


# the contract, and every module that defines a dispatcher (a new one is picked up here)
DISPATCHER_MODULES = ["contract.py"] + [
    p.name for p in sorted(PARALLEL.glob("*.py")) if _defines_a_dispatcher(_tree(p.name))
]


def test_the_dispatcher_modules_are_found():
    assert {"contract.py", "dispatch.py", "dedup.py"} <= set(DISPATCHER_MODULES)
    assert "expert_parallel.py" not in DISPATCHER_MODULES


def autograd_functions(tree: ast.Module) -> list[str]:
    """Classes deriving from ``torch.autograd.Function`` (any spelling of the base)."""
    return [
        n.name
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef) and any(_dotted(b).endswith("Function") for b in n.bases)
    ]


def wavefront_uses(tree: ast.Module) -> list[int]:
    """Lines that import the wavefront scheduler or call ``run_wavefront``."""
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (
            (n.module or "").endswith("pipeline") or any(a.name == "run_wavefront" for a in n.names)
        ):
            out.append(n.lineno)
        elif isinstance(n, ast.Import) and any(a.name.endswith(".pipeline") for a in n.names):
            out.append(n.lineno)
        elif isinstance(n, ast.Call) and _dotted(n.func).split(".")[-1] == "run_wavefront":
            out.append(n.lineno)
    return out


@pytest.mark.parametrize("name", DISPATCHER_MODULES)
def test_dispatchers_have_no_pipeline_or_autograd_of_their_own(name):
    tree = _tree(name)
    assert autograd_functions(tree) == [], name
    assert wavefront_uses(tree) == [], name


def test_the_checks_see_a_pipeline_grown_back(tmp_path):
    src = (
        "import torch\n"
        "class _Mine(torch.autograd.Function):\n    pass\n"
        "def run(routes):\n"
        "    from moeflow.parallel.pipeline import run_wavefront\n"
        "    return run_wavefront(len(routes), [])\n"
    )
    tree = ast.parse(src)
    assert autograd_functions(tree) == ["_Mine"]
    assert wavefront_uses(tree) == [5, 6]


def test_one_driver_holds_the_autograd_and_the_wavefront():
    tree = _tree("expert_parallel.py")
    assert autograd_functions(tree) == ["PipelinedExperts"]
    assert wavefront_uses(tree)  # _Run._pipeline drives every dispatcher


def test_expert_parallel_forward_does_not_branch_on_the_dispatcher():
    tree = _tree("expert_parallel.py")
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "ExpertParallel")
    for fn in cls.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in ("forward", "forward_local"):
            names = {n.attr for n in ast.walk(fn) if isinstance(n, ast.Attribute)}
            names |= {n.value for n in ast.walk(fn) if isinstance(n, ast.Constant)}
            for flag in ("token_level", "consumes_tokens", "forward_tokens", "expand"):
                assert flag not in names, (fn.name, flag)


def private_accesses(tree: ast.Module) -> list[tuple[int, str]]:
    """``obj._name`` where obj is not ``self`` / ``cls`` (dunders and torch's own excepted)."""
    out = []
    for n in ast.walk(tree):
        if not isinstance(n, ast.Attribute) or not n.attr.startswith("_"):
            continue
        if n.attr.startswith("__") or n.attr in TORCH_PRIVATE:
            continue
        if isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"):
            continue
        out.append((n.lineno, _dotted(n)))
    return out


# torch.nn.Module's own tables (no public getters): its hooks, to replicate the layer's
# forward pre-hooks; its parameter / buffer / child dicts, to move modules to and from meta
TORCH_PRIVATE = {
    "_forward_pre_hooks",
    "_parameters",
    "_buffers",
    "_non_persistent_buffers_set",
    "_modules",
}


@pytest.mark.parametrize("path", sorted(PARALLEL.glob("*.py")), ids=lambda p: p.name)
def test_no_module_calls_anothers_private_members(path):
    assert private_accesses(ast.parse(path.read_text(), path.name)) == [], path.name


def test_the_private_check_sees_an_outside_write():
    tree = ast.parse("def f(ep, x):\n    ep.aux_loss = 0\n    return ep._forward_local(x)\n")
    assert private_accesses(tree) == [(3, "ep._forward_local")]
