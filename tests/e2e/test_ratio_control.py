"""The ratio controller on real processes: ``pdserve up --engine mock --switchable`` with
the gateway's controller on (PDSERVE_CONTROL_PERIOD_S). Decode-heavy load on a
prefill-heavy group: the controller switches prefills to decode, and every request still
ends with all its tokens."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import pytest

from pdserve.v1 import generation_service_pb2, generation_service_pb2_grpc
from tests.e2e.conftest import UpProcess, start_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    # smollm2-cpu mock profile: ~0.25 s prefills, 50 ms decode steps; 2 decode slots make
    # decode the bottleneck of a 4p2d group (Eq. 1: 2p4d).
    env = {"PDSERVE_CONTROL_PERIOD_S": "10", "PDSERVE_SLOTS": "2", "PDSERVE_HEARTBEAT_S": "0.2"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cluster = start_up(tmp_path_factory.mktemp("up-control"), "--engine", "mock",
                           "--groups", "g0:4p2d", "--slots", "1", "--switchable",
                           timeout=180)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield cluster
    cluster.stop()


def roles(up: UpProcess) -> list[str]:
    url = next(line.split("redis ")[-1] for line in up.output().splitlines()
               if "redis unix" in line or "redis redis" in line)
    out = subprocess.run([sys.executable, "-m", "services.cli", "status", "--redis-url", url],
                         capture_output=True, text=True, timeout=60).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.startswith("  "))


def test_controller_switches_prefills_to_decode_without_losing_requests(up: UpProcess) -> None:
    assert roles(up).count("prefill") == 4
    errors: list[BaseException] = []
    finished = [0]
    done = threading.Event()

    def user(k: int) -> None:
        with grpc.insecure_channel(up.address) as ch:
            stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
            i = 0
            while not done.is_set():
                i += 1
                ids = [16 + (k * 131 + i * 17 + j) % 200 for j in range(64)]
                try:
                    got = 0
                    for msg in stub.Generate(generation_service_pb2.GenerateRequest(
                            prompt_token_ids=ids, max_tokens=48, scenario="g0"), timeout=120):
                        got += len(msg.token_ids)
                    assert got == 48
                    finished[0] += 1
                except BaseException as e:  # collected, asserted below
                    errors.append(e)

    users = [threading.Thread(target=user, args=(k,)) for k in range(8)]
    for t in users:
        t.start()
    switched = False
    try:
        end = time.monotonic() + 150
        while time.monotonic() < end and not switched:
            time.sleep(2)
            switched = roles(up).count("decode") > 2
    finally:
        done.set()
        for t in users:
            t.join()
    assert switched, f"no prefill switched to decode: {roles(up)}"
    assert roles(up).count("prefill") >= 2  # never below two of a role
    assert errors == [] and finished[0] > 0
