"""Import contracts of the house, checked on every CI run.

- import-linter (``[tool.importlinter]`` in pyproject.toml): services never import each
  other; gateway and kvstore never import torch; libraries never import a service.
- Here, from the source: the pure policy modules import only the standard library and
  other pure (or value-only) modules, and no import cycle exists in ``services/`` or
  ``bench/`` (lazy imports inside functions count: the old modelinfo <-> engine cycle
  was one).
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]

# Policy code shared by the live services and the simulator: no I/O, no clock of its own.
PURE = {
    "services.gateway.scheduling", "services.gateway.policy",
    "services.device.controller", "services.device.optimizer", "services.device.handoff",
    "services.engine.paged", "services.control.perfmodel", "services.control.controller",
    "services.control.actuator",
}
# What pure code may still import from the project: value types and constants.
VALUE = {"services.kv.base"}
# The kvstore's KV lifecycle (store.py) is the one policy core that owns memory: it may
# also use the domain errors, the wire limits and the segment pool (no network, no Redis).
STORE_EXTRA = {"services.common.errors", "services.kv.wire", "services.kvstore.memory"}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (function-level and type-checking
    imports included)."""
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def _sources(*tops: str) -> dict[str, Path]:
    return {_module(p): p for top in tops for p in (ROOT / top).rglob("*.py")}


def _project(name: str, known: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (a module, or the package of a name)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def test_import_linter_contracts_hold() -> None:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a dev dependency (pyproject.toml)"
    run = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]


def test_pure_modules_import_only_stdlib_and_pure_modules() -> None:
    known = _sources("services")
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    missing = PURE - set(known)
    assert not missing - {"services.control.perfmodel", "services.control.controller",
                          "services.control.actuator"}, missing
    bad: dict[str, set[str]] = {}
    for mod in PURE & set(known):
        allowed = PURE | VALUE | (STORE_EXTRA if mod == "services.kvstore.store" else set())
        for name in _imports(known[mod]):
            top = name.partition(".")[0]
            if top in stdlib or name == "typing":
                continue
            # ``from pkg import name`` records pkg.name too: both resolve to a project module
            target = _project(name, known)
            if target is not None and (target in allowed or target == mod):
                continue
            bad.setdefault(mod, set()).add(name)
    assert not bad, f"pure modules import I/O or third-party code: {bad}"


def test_kvstore_store_keeps_to_its_allowance() -> None:
    known = _sources("services")
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    allowed = PURE | VALUE | STORE_EXTRA
    bad = {n for n in _imports(known["services.kvstore.store"])
           if n.partition(".")[0] not in stdlib
           and _project(n, known) not in allowed | {"services.kvstore.store"}}
    assert not bad, bad


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_services_or_bench() -> None:
    known = _sources("services", "bench")
    graph: dict[str, set[str]] = {}
    for mod, path in known.items():
        targets = {_project(n, known) for n in _imports(path)}
        # A package's __init__ re-exporting its modules is not a cycle of concern.
        graph[mod] = {t for t in targets if t and t != mod and not mod.startswith(t + ".")}
    assert _cycles(graph) == []
