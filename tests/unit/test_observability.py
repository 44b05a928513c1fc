"""What operators see, checked without a cluster: the dashboard compose provisions is the
generated one and queries only metrics pdserve exports; the Prometheus config is valid;
every `pdserve` flag (CLI commands and each service's config) has a help line with its
default and its environment variable."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from services.common.config import field_docs
from services.observe.metrics import PREFIX, SCRAPED

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def _gen_dashboard():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("gen_dashboard",
                                                  ROOT / "scripts/gen_dashboard.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def exported_names() -> set[str]:
    """Every sample name pdserve's registry can expose (histogram and counter suffixes)."""
    names = set()
    for collector in list(REGISTRY._collector_to_names):
        for name in REGISTRY._collector_to_names[collector]:
            if name.startswith(PREFIX):
                names.add(name)
    for name, (kind, _) in SCRAPED.items():
        names.add(name + "_total" if kind == "counter" else name)
    return names


def test_dashboard_is_generated_and_queries_exported_metrics() -> None:
    gen = _gen_dashboard()
    assert gen.OUT.read_text() == gen.render(), "run python scripts/gen_dashboard.py"
    exported = exported_names()
    used = set(re.findall(r"pdserve:[a-z0-9_]+", gen.OUT.read_text()))
    assert used and used <= exported, sorted(used - exported)
    titles = " ".join(p[0] for p in gen.PANELS)
    for topic in ("TTFT", "TPOT", "Goodput", "rejections", "forwards", "queue depth",
                  "KV transfer rate", "fallbacks"):
        assert topic.lower() in titles.lower(), topic


def test_prometheus_config_is_valid() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool (Debian package prometheus) is not installed")
    res = subprocess.run([promtool, "check", "config",
                          str(ROOT / "compose/observability/prometheus.yml")],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stdout + res.stderr


def _actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [a for a in parser._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


def test_every_cli_flag_has_help_default_and_env() -> None:
    from services.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions
               if isinstance(a, argparse._SubParsersAction))
    commands = {"up": sub.choices["up"], "generate": sub.choices["generate"],
                "status": sub.choices["status"]}
    msub = next(a for a in sub.choices["model"]._actions
                if isinstance(a, argparse._SubParsersAction))
    commands["model prepare"] = msub.choices["prepare"]
    for name, p in commands.items():
        for action in _actions(p):
            text = action.help or ""
            assert "default:" in text and "env PDSERVE_" in text, (name, action.option_strings)
    assert "curl -N" in (sub.choices["generate"].epilog or "")


@pytest.mark.parametrize("path", ["services.gateway.main:GatewayConfig",
                                  "services.prefill.main:PrefillConfig",
                                  "services.decode.main:DecodeConfig",
                                  "services.kvstore.main:KvStoreConfig"])
def test_every_service_flag_has_a_help_line(path: str) -> None:
    import importlib

    module, _, name = path.partition(":")
    cls = getattr(importlib.import_module(module), name)
    docs = field_docs(cls)
    missing = [f.name for f in dataclasses.fields(cls) if not docs.get(f.name)]
    assert not missing, f"{name}: fields without a comment (their --help line): {missing}"
