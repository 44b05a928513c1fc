"""The `pdserve` command as a user runs it: `model prepare`, `up` with scenario groups,
the mock engine and a baseline scheduler, `status` against the cluster's Redis, and
`generate` through it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import UpProcess, start_up

pytestmark = pytest.mark.e2e


def pdserve(*args: str, timeout: float = 120, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def grouped_mock(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    up = start_up(tmp_path_factory.mktemp("up-cli"), "--engine", "mock", "--profile",
                  "scaled-gpu", "--groups", "code:2p1d,chat:1p1d", "--scheduler", "los-queue")
    try:
        yield up
    finally:
        up.stop()


def _redis_url(up: UpProcess) -> str:
    m = re.search(r"redis (\S+)", up.output())
    assert m, up.output()
    return m.group(1)


def test_model_prepare_prints_the_cached_model(tmp_path: Path) -> None:
    run = pdserve("model", "prepare", "--model", "tiny")
    assert run.returncode == 0, run.stderr
    name, _, path = run.stdout.strip().rpartition(": ")
    assert name.endswith("tiny") and (Path(path) / "config.json").is_file()


def test_model_prepare_rejects_an_unknown_model() -> None:
    run = pdserve("model", "prepare", "--model", "/nonexistent/model")
    assert run.returncode != 0
    assert "unknown model" in (run.stderr + run.stdout)


def test_up_with_groups_mock_engine_and_a_baseline_scheduler(grouped_mock: UpProcess) -> None:
    status = pdserve("status", "--redis-url", _redis_url(grouped_mock))
    assert status.returncode == 0, status.stderr
    text = status.stdout
    # Both scenario groups, with the P/D ratio each was started with.
    code = text[text.index("code"):]
    assert re.search(r"code\b", text) and re.search(r"chat\b", text), text
    assert code.count("prefill") >= 2 and text.count("decode") >= 2, text
    # The scheduler and the engine reached the processes that use them.
    pid = int(grouped_mock.ready("gateway")["pid"])  # type: ignore[call-overload]
    env = dict(kv.split("=", 1) for kv in
               Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in kv)
    assert env.get("PDSERVE_SCHEDULER") == "los-queue", env
    assert env.get("PDSERVE_MODEL", "").startswith("mock:"), env


def test_generate_through_each_group(grouped_mock: UpProcess) -> None:
    for scenario in ("code", "chat"):
        run = pdserve("generate", "--address", grouped_mock.address, "--scenario", scenario,
                      "--max-tokens", "5", "hello")
        assert run.returncode == 0, run.stderr
        assert "length" in run.stdout + run.stderr or "stop" in run.stdout + run.stderr


def test_status_without_redis_says_how_to_find_it() -> None:
    run = pdserve("status", env={"PDSERVE_REDIS_URL": ""})
    assert run.returncode == 2 and "--redis-url" in run.stderr
