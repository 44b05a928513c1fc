"""Role switching and group operations on real processes (``pdserve up --engine mock
--switchable --spares 2`` and the ``pdserve group`` CLI): a worker switches role under
load without losing a request; a group is scaled out from spares, upgraded, scaled in."""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import pytest

from pdserve.v1 import admin_service_pb2 as apb
from pdserve.v1 import admin_service_pb2_grpc as apb_grpc
from pdserve.v1 import generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.conftest import UpProcess, start_up

pytestmark = [pytest.mark.e2e]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> UpProcess:
    cluster = start_up(tmp_path_factory.mktemp("up-switch"), "--engine", "mock", "--prefill",
                       "1", "--decode", "2", "--switchable", "--spares", "2", timeout=120)
    yield cluster  # type: ignore[misc]
    cluster.stop()


def generate(address: str, scenario: str = "", n: int = 8) -> list[int]:
    with grpc.insecure_channel(address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        ids: list[int] = []
        for msg in stub.Generate(generation_service_pb2.GenerateRequest(
                prompt="a request through a switching cluster", max_tokens=n,
                scenario=scenario), timeout=60):
            ids.extend(msg.token_ids)
        return ids


def group(up: UpProcess, *args: str) -> str:
    admin = str(up.ready("admin")["address"])
    token = (up.log_dir / "cluster-token").read_text().strip()  # the admin requires it
    out = subprocess.run([sys.executable, "-m", "services.cli", "group", "--admin", admin,
                          "--cluster-token", token, *args], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_switch_under_load_loses_nothing(up: UpProcess) -> None:
    errors: list[BaseException] = []
    done = threading.Event()

    def load() -> None:
        while not done.is_set():
            try:
                assert len(generate(up.address, n=16)) >= 1
            except BaseException as e:  # collected, asserted below
                errors.append(e)

    users = [threading.Thread(target=load) for _ in range(3)]
    for t in users:
        t.start()
    try:
        with grpc.insecure_channel(str(up.ready("decode-1")["address"])) as ch:
            stub = apb_grpc.WorkerControlServiceStub(ch)
            # Workers refuse control calls without the cluster's token (pdserve up wrote it).
            token = (up.log_dir / "cluster-token").read_text().strip()
            md = [("x-pdserve-cluster-token", token)]
            for role in ("prefill", "decode", "prefill", "decode"):
                st = stub.Assign(apb.AssignRequest(role=role, group="default"), timeout=120,
                                 metadata=md)
                assert st.role == role and st.weights_kept
                assert st.aborted_on_drain_total == 0
    finally:
        done.set()
        for t in users:
            t.join()
    assert errors == []


def test_scale_out_upgrade_scale_in_through_the_cli(up: UpProcess) -> None:
    assert "spares: 2" in group(up, "list")
    out = group(up, "scale-out", "chat", "--prefill", "1", "--decode", "1")
    assert "group chat serving 1p1d" in out
    assert "group chat: 1p1d" in group(up, "list")
    assert len(generate(up.address, scenario="chat")) >= 1
    out = group(up, "upgrade", "--group", "chat", "--set", "slots=8")
    assert "ratio 1p1d" in out and "upgrade finished" in out
    assert len(generate(up.address, scenario="chat")) >= 1
    assert "group chat removed" in group(up, "scale-in", "chat")
    listing = group(up, "list")
    assert "group chat" not in listing and "spares: 2" in listing
    assert len(generate(up.address)) >= 1  # the default group never stopped serving


def test_a_dead_switched_worker_comes_back_in_the_role_it_served(up: UpProcess) -> None:
    """The launcher restarts a dead worker as what the registry said it served (here a
    spare that scale-out had made chat's decode), not as what it was started as."""
    import json
    import os
    import signal
    import time

    group(up, "scale-out", "chat2", "--prefill", "1", "--decode", "1")
    listing = group(up, "list")
    decode = next(line.split()[1] for line in listing.splitlines()
                  if line.strip().startswith("decode") and "spare-" in line)
    os.kill(int(up.ready(decode)["pid"]), signal.SIGKILL)
    end = time.monotonic() + 90
    log = up.log_dir / "supervisor.jsonl"
    evs: list[dict[str, object]] = []
    while time.monotonic() < end:
        evs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        if any(e["event"] == "serving" and e["name"] == decode and e.get("after_s")
               for e in evs):
            break
        time.sleep(0.2)
    died = next(e for e in evs if e["event"] == "died" and e["name"] == decode)
    assert (died["role"], died["group"]) == ("decode", "chat2")
    # both spares serve chat2 now: no idle one to hand the role to, so it restarts as is
    assert not any(e["event"] == "substituted" and e["name"] == decode for e in evs)
    for _ in range(50):  # its new registration
        if "group chat2: 1p1d" in group(up, "list"):
            break
        time.sleep(0.2)
    assert "group chat2: 1p1d" in group(up, "list")
    assert len(generate(up.address, scenario="chat2")) >= 1
    group(up, "scale-in", "chat2")
