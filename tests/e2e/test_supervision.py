"""``pdserve up`` supervises its children (mock engine, real processes): a SIGKILLed
prefill, decode, kvstore, gateway or redis-server is substituted and the cluster keeps
serving; a killed launcher leaves no orphan (redis-server included); Ctrl-C stops all."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from pdserve.v1 import generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.conftest import UpProcess, start_up

pytestmark = [pytest.mark.e2e]

MOCK = ("--engine", "mock", "--profile", "smollm2-cpu")


def generate(address: str, timeout: float = 30) -> list[int]:
    with grpc.insecure_channel(address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        ids: list[int] = []
        for msg in stub.Generate(generation_service_pb2.GenerateRequest(
                prompt="supervised request", max_tokens=4), timeout=timeout):
            ids.extend(msg.token_ids)
        return ids


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its parent) is dead too
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def ready_pid(up: UpProcess, name: str) -> int:
    return int(json.loads((up.log_dir / f"{name}.ready.json").read_text())["pid"])


def events(up: UpProcess) -> list[dict[str, object]]:
    path = up.log_dir / "supervisor.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def wait_for(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.1)
    raise TimeoutError("condition not met in time")


def serves(address: str) -> bool:
    try:
        return len(generate(address, timeout=10)) >= 1
    except grpc.RpcError:
        return False


def redis_pid(up: UpProcess) -> int:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        # redis-server retitles itself "redis-server unixsocket:<path>"
        if b"redis-server" in cmd and str(up.log_dir / "redis").encode() in cmd \
                and pid_alive(int(pid)):
            return int(pid)
    raise LookupError("no redis-server of this cluster")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> UpProcess:
    up = start_up(tmp_path_factory.mktemp("up-supervised"), *MOCK, "--prefill", "1",
                  "--decode", "1", timeout=120)
    yield up  # type: ignore[misc]
    up.stop()


@pytest.mark.parametrize("name", ["prefill-0", "decode-0", "kvstore", "gateway"])
def test_a_killed_child_is_restarted_and_the_cluster_serves(cluster: UpProcess,
                                                            name: str) -> None:
    assert serves(cluster.address)
    old = ready_pid(cluster, name)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: any(e["event"] == "serving" and e["name"] == name and e["after_s"]
                         for e in events(cluster) if e["t"] > time.time() - 120))
    assert cluster.proc.poll() is None  # the launcher did not stop the cluster
    assert ready_pid(cluster, name) != old
    wait_for(lambda: serves(cluster.address), 30)


def test_a_killed_redis_is_restarted(cluster: UpProcess) -> None:
    os.kill(redis_pid(cluster), signal.SIGKILL)
    wait_for(lambda: any(e["event"] == "restarted" and e["name"] == "redis"
                         for e in events(cluster)), 30)
    # Services re-register at their next heartbeat; the gateway routes again.
    wait_for(lambda: serves(cluster.address), 60)
    assert cluster.proc.poll() is None


def test_a_dead_prefill_goes_to_a_spare(tmp_path: Path) -> None:
    up = start_up(tmp_path / "up", *MOCK, "--prefill", "1", "--decode", "1", "--switchable",
                  "--spares", "1", timeout=120)
    try:
        assert serves(up.address)
        os.kill(ready_pid(up, "prefill-0"), signal.SIGKILL)
        wait_for(lambda: any(e["event"] == "substituted" for e in events(up)), 60)
        sub = next(e for e in events(up) if e["event"] == "substituted")
        assert sub["name"] == "prefill-0" and sub["by"] == "spare-0"
        # a new spare replaces the one that took the role
        wait_for(lambda: any(e["event"] == "serving" and e["name"] == "spare-1"
                             for e in events(up)), 60)
        assert serves(up.address)
    finally:
        assert up.stop() == 0


def test_killing_the_launcher_leaves_no_orphan(tmp_path: Path) -> None:
    up = start_up(tmp_path / "up", *MOCK, "--prefill", "1", "--decode", "1", timeout=120)
    pids = [*up.child_pids(), redis_pid(up)]
    assert len(pids) == 5
    up.proc.kill()  # SIGKILL: no handler runs; the kernel's parent-death signal does it
    up.proc.wait()
    wait_for(lambda: not [p for p in pids if pid_alive(p)], 30)


def test_ctrl_c_stops_everything(tmp_path: Path) -> None:
    up = start_up(tmp_path / "up", *MOCK, "--prefill", "1", "--decode", "1", "--switchable",
                  "--spares", "1", timeout=120)
    pids = [*up.child_pids(), redis_pid(up)]
    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(60) == 0
    assert "pdserve: stopped" in up.output()
    wait_for(lambda: not [p for p in pids if pid_alive(p)], 10)
