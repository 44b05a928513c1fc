"""One real-process cluster for the whole tests/faults session: the fuzz tests run first
(test_fuzz.py sorts before test_matrix.py), then the fault matrix, which kills and restarts
its victims."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import ProcCluster, netns_possible

NETNS_WHY_NOT = netns_possible()


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcCluster]:
    c = ProcCluster(Path(tmp_path_factory.mktemp("faults")), gateways=2,
                    partition=not NETNS_WHY_NOT, env={"PDSERVE_DEFAULT_MAX_TOKENS": "8"})
    try:
        c.start()
        yield c
    finally:
        c.stop()
