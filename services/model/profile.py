"""Where latency profiles live: the mock engine's built-in profiles, by name or path."""

from __future__ import annotations

from pathlib import Path

PROFILE_DIR = Path(__file__).parent / "profiles"


def profile_path(name: str) -> Path:
    """A built-in profile by name (``scaled-gpu``), or a ``.json`` file path."""
    p = Path(name)
    if p.suffix == ".json" and p.exists():
        return p
    builtin = PROFILE_DIR / f"{name}.json"
    if not builtin.exists():
        known = sorted(q.stem for q in PROFILE_DIR.glob("*.json"))
        raise ValueError(f"unknown mock profile {name!r}; built-in: {known}, or a .json path")
    return builtin
