"""The package's shape, checked (issue 13): the node package is never imported by login-side code,
the node never imports the registry, no code outside backends/ branches on a backend's name, and
no code outside workdir/ names a run-directory file."""
import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
PKG = Path(__file__).resolve().parents[1] / "ssflctl"
LOGIN = ("plan", "control", "registry", "backends", "commands", "report", "workdir", "evaluation", "convert")
RUN_FILES = {"run.json", "attempt.json", "progress.json", "outcome.json", "nan.json", "recovery.json",
             "metrics.json", "provenance.json", "detections.bbox.json", "detections.gt.json", "jobs.json",
             "test_jobs.json"}


def _modules(*packages):
    for pkg in packages:
        yield from sorted((PKG / pkg).rglob("*.py"))


def _imports(path):
    """Every module a file imports, at any depth (function bodies included)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{a.name}" for a in node.names)


def test_login_side_never_imports_the_node_package():
    bad = [(p.relative_to(PKG), m) for p in _modules(*LOGIN) for m in _imports(p)
           if m == "ssflctl.node" or m.startswith("ssflctl.node.")]
    bad += [(Path("cli.py"), m) for m in _imports(PKG / "cli.py") if m.startswith("ssflctl.node")]
    assert bad == []


def test_node_never_imports_the_registry_or_the_login_commands():
    bad = [(p.relative_to(PKG), m) for p in _modules("node") for m in _imports(p)
           if m.startswith(("ssflctl.registry", "ssflctl.control", "ssflctl.commands", "ssflctl.backends"))]
    assert bad == []


def _docstrings(tree):
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def test_only_backends_branch_on_a_backend_name():
    bad = []
    for p in PKG.rglob("*.py"):
        if "backends" in p.relative_to(PKG).parts:
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Compare):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
                for c in [node.left, *node.comparators]:
                    if isinstance(c, (ast.Tuple, ast.List, ast.Set)):
                        consts += [e.value for e in c.elts if isinstance(e, ast.Constant)]
                if {"slurm", "local"} & set(consts):
                    bad.append(f"{p.relative_to(PKG)}:{node.lineno}")
    assert bad == []


def test_only_workdir_names_run_directory_files():
    bad = []
    for p in PKG.rglob("*.py"):
        if p.relative_to(PKG).parts[0] == "workdir":
            continue
        tree = ast.parse(p.read_text())
        docs = _docstrings(tree)
        fstring_parts = {id(v) for n in ast.walk(tree) if isinstance(n, ast.JoinedStr) for v in n.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in RUN_FILES \
                    and id(node) not in docs and id(node) not in fstring_parts:
                bad.append(f"{p.relative_to(PKG)}:{node.lineno} {node.value}")
    assert bad == []
