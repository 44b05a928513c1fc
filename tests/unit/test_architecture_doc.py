"""docs/architecture.md stays true: every module of services/, bench/ and scripts/ has
its line in the module table, and every module the table names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "architecture.md"
SKIP = {"__init__.py", "__main__.py"}


def _modules() -> set[str]:
    out = set()
    for top in ("services", "bench", "scripts"):
        for p in (ROOT / top).rglob("*.py"):
            if p.name not in SKIP and "__pycache__" not in p.parts:
                out.add(p.relative_to(ROOT).as_posix())
    return out


def _named() -> set[str]:
    table = DOC.read_text().split("## Modules", 1)[1]
    return set(re.findall(r"^\| `((?:services|bench|scripts)/[^`]+\.py)` \|", table, re.M))


def test_every_module_has_a_line() -> None:
    missing = sorted(_modules() - _named())
    assert not missing, "docs/architecture.md has no line for: " + ", ".join(missing)


def test_every_line_names_a_module_that_exists() -> None:
    stale = sorted(_named() - _modules())
    assert not stale, "docs/architecture.md names modules that are gone: " + ", ".join(stale)


def test_every_package_says_what_it_is() -> None:
    for init in (ROOT / "services").glob("*/__init__.py"):
        text = init.read_text().strip()
        assert text.startswith('"""') and len(text) > 40, f"{init}: a one-sentence docstring"
