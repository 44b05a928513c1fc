"""P/D-Device at fleet scale with real processes: many sessions survive the cloud dying.

Two cases, each with its own `pdserve up` (the test SIGKILLs its gateway):
  - a fleet process (`pdserve serve device --engine mock --fleet-size 6`) against a
    mock cloud: six devices in pd_device mid-answer when the gateway dies; every answer
    completes locally, coherent (cloud tokens, then device tokens, display ordered);
  - a torch device (tiny, stretched k = 20) with three concurrent chats: after the kill
    each answer is still token-identical to in-process greedy `generate`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from pdserve.v1 import device_service_pb2 as pb
from pdserve.v1 import device_service_pb2_grpc as pb_grpc
from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer
from tests.e2e.conftest import UpProcess, start_up
from tests.e2e.test_cluster import generate_ref

pytestmark = pytest.mark.e2e
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs away. "


def start_device(tmp: Path, cloud: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    ready = tmp / "device.ready.json"
    log = open(tmp / "device.out", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "device", "--model", "tiny",
         "--cloud-address", cloud, "--ready-file", str(ready), *args],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    end = time.monotonic() + 120
    while not ready.exists():
        assert proc.poll() is None, (tmp / "device.out").read_text()
        assert time.monotonic() < end, "device not ready"
        time.sleep(0.1)
    return proc, str(json.loads(ready.read_text())["address"])


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own group only
        proc.wait()


def chats_with_kill(address: str, up: UpProcess, requests: list[pb.ChatRequest]
                    ) -> list[tuple[list[pb.DisplayedToken], pb.ChatSummary]]:
    """Run the chats at once; SIGKILL the gateway when every one has shown a token."""
    gateway = int(up.ready("gateway")["pid"])
    started = threading.Barrier(len(requests) + 1)
    out: list[tuple[list[pb.DisplayedToken], pb.ChatSummary] | BaseException] = \
        [RuntimeError("no result")] * len(requests)

    def one(i: int) -> None:
        shown: list[pb.DisplayedToken] = []
        try:
            with grpc.insecure_channel(address) as ch:
                for msg in pb_grpc.DeviceServiceStub(ch).Chat(requests[i], timeout=180):
                    if msg.tokens and not shown:
                        started.wait(60)
                    shown.extend(msg.tokens)
                    if msg.HasField("summary"):
                        out[i] = (shown, msg.summary)
        except BaseException as e:  # reported by the assertion below
            out[i] = e
            started.abort()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    started.wait(120)
    print(f"kill after {time.monotonic() - t0:.2f} s")
    os.kill(gateway, signal.SIGKILL)  # a process this test started (via pdserve up)
    for t in threads:
        t.join(180)
    for r in out:
        if isinstance(r, BaseException):
            raise r
    return out  # type: ignore[return-value]


@pytest.fixture()
def mock_cloud(tmp_path: Path) -> Iterator[UpProcess]:
    up = start_up(tmp_path / "up", "--engine", "mock", "--profile", "scaled-gpu")
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture()
def tiny_cloud(tmp_path: Path) -> Iterator[UpProcess]:
    up = start_up(tmp_path / "up", "--model", "tiny")
    try:
        yield up
    finally:
        up.stop()


def test_fleet_sessions_finish_locally_when_the_cloud_dies(mock_cloud: UpProcess,
                                                          tmp_path: Path) -> None:
    n = 6
    proc, address = start_device(
        tmp_path, mock_cloud.address, "--engine", "mock", "--device-profile", "phone",
        "--fleet-size", str(n), "--fleet-spread", "0.2", "--wan-rtt-ms", "50",
        "--chunk-tokens", "256")
    try:
        # ~1.5k-token prompts: the phone needs ~2 s to catch up, so every session is still
        # showing cloud tokens when the gateway dies.
        reqs = [pb.ChatRequest(prompt_token_ids=[16 + (i * 7 + j) % 200 for j in range(1500)],
                               max_tokens=160, device_index=i, token_budget=160, tau_ms=40,
                               mode=pb.DEVICE_MODE_PD_DEVICE) for i in range(n)]
        results = chats_with_kill(address, mock_cloud, reqs)
    finally:
        stop(proc)
    for i, (shown, s) in enumerate(results):
        assert s.device_index == i and len(shown) == 160, s  # complete
        assert s.fallback and "local prefill" in s.fallback
        src = [t.source for t in shown]
        c = src.count(pb.TOKEN_SOURCE_CLOUD)
        assert c >= 1 and src == [pb.TOKEN_SOURCE_CLOUD] * c + [pb.TOKEN_SOURCE_DEVICE] * (160 - c)
        times = [t.display_ms for t in shown]
        assert times == sorted(times)


def test_concurrent_torch_sessions_stay_token_identical_when_the_cloud_dies(
        tiny_cloud: UpProcess, tmp_path: Path) -> None:
    proc, address = start_device(
        tmp_path, tiny_cloud.address, "--speed-factor", "20", "--wan-rtt-ms", "20",
        "--chunk-tokens", "64", "--torch-threads", "1")
    prompts = [PROMPT * (10 + 2 * i) for i in range(3)]
    try:
        reqs = [pb.ChatRequest(prompt=p, max_tokens=32, token_budget=32, tau_ms=40,
                               mode=pb.DEVICE_MODE_PD_DEVICE) for p in prompts]
        results = chats_with_kill(address, tiny_cloud, reqs)
    finally:
        stop(proc)
    path = ModelInfo.load("tiny").path
    from transformers import AutoModelForCausalLM

    tok, model = TextTokenizer(path), AutoModelForCausalLM.from_pretrained(path).eval()
    for p, (shown, s) in zip(prompts, results, strict=True):
        assert s.fallback and "local prefill" in s.fallback
        assert [t.token_id for t in shown] == generate_ref(model, tok.encode(p), 32)
        assert any(t.source == pb.TOKEN_SOURCE_DEVICE for t in shown)
