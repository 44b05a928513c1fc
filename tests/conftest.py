"""Session fixtures: one real redis-server, one in-memory span exporter."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.cluster.redis_embed import EmbeddedRedis
from services.engine.prepare import ensure_prepared
from services.observe.telemetry import setup_telemetry

SPANS = InMemorySpanExporter()
MARKED_DIRS = ("unit", "integration", "e2e", "faults")


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    setup_telemetry("pdserve-tests", exporter=SPANS)
    # The explicit prepare step (ModelInfo.load only reads); SmolLM2 is prepared by the
    # tests that use it.
    ensure_prepared("tiny")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test carries the marker of its folder (unit, integration, e2e, faults), so
    ``-m unit`` selects every unit test whether or not its file says so."""
    for item in items:
        parts = item.path.relative_to(Path(__file__).parent).parts
        if len(parts) > 1 and parts[0] in MARKED_DIRS:
            item.add_marker(parts[0])


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    server = EmbeddedRedis()
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture()
def spans() -> InMemorySpanExporter:
    SPANS.clear()
    return SPANS
