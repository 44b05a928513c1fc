"""The service boundary: services never import each other (shared code lives in library
packages), with one stated exception: ``services.worker`` hosts the prefill and decode
roles in one process and imports their servicer modules (services/worker/main.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2] / "services"
SERVICES = {"gateway", "prefill", "decode", "kvstore", "device", "worker", "admin"}
# importer -> services it may import (one-way; see services/worker/main.py)
ALLOWED = {"worker": {"prefill", "decode"}}


def _imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append(node.module)
    return out


def _violations() -> list[str]:
    bad = []
    for svc in sorted(SERVICES):
        for path in sorted((ROOT / svc).rglob("*.py")) if (ROOT / svc).is_dir() else []:
            for mod in _imports(path):
                parts = mod.split(".")
                if parts[0] != "services" or len(parts) < 2:
                    continue
                other = parts[1]
                if other in SERVICES and other != svc and other not in ALLOWED.get(svc, set()):
                    bad.append(f"{path.relative_to(ROOT.parent)} imports {mod}")
    return bad


def test_services_do_not_import_each_other() -> None:
    assert _violations() == []


def test_the_worker_exception_is_one_way() -> None:
    for svc in ("prefill", "decode"):
        for path in (ROOT / svc).rglob("*.py"):
            assert not any(m.startswith("services.worker") for m in _imports(path)), path
