"""P/D-Device with real processes: `pdserve up --model tiny`, a device process
(`pdserve serve device`) behind an emulated WAN, and `pdserve device chat`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from pdserve.v1 import device_service_pb2 as pb
from pdserve.v1 import device_service_pb2_grpc as pb_grpc
from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer
from tests.e2e.conftest import UpProcess, start_up
from tests.e2e.test_cluster import generate_ref

pytestmark = pytest.mark.e2e
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs away. " * 12


@pytest.fixture(scope="module")
def reference_model():  # type: ignore[no-untyped-def]
    from transformers import AutoModelForCausalLM

    path = ModelInfo.load("tiny").path
    return TextTokenizer(path), AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    up = start_up(tmp_path_factory.mktemp("up-device"), "--model", "tiny")
    try:
        yield up
    finally:
        up.stop()


@pytest.fixture(scope="module")
def device(cloud: UpProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("device")
    ready = tmp / "device.ready.json"
    log = open(tmp / "device.out", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "device", "--model", "tiny",
         "--cloud-address", cloud.address, "--speed-factor", "20", "--wan-rtt-ms", "20",
         "--chunk-tokens", "64", "--torch-threads", "1", "--ready-file", str(ready)],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    try:
        end = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, (tmp / "device.out").read_text()
            assert time.monotonic() < end, "device not ready"
            time.sleep(0.1)
        yield str(json.loads(ready.read_text())["address"])
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # our own group only
            proc.wait()


def chat(address: str, on_first: object = None, **kw: object
         ) -> tuple[list[int], list[pb.DisplayedToken], pb.ChatSummary]:
    shown: list[pb.DisplayedToken] = []
    summary = None
    with grpc.insecure_channel(address) as ch:
        for msg in pb_grpc.DeviceServiceStub(ch).Chat(pb.ChatRequest(**kw), timeout=120):  # type: ignore[arg-type]
            if msg.tokens and not shown and callable(on_first):
                on_first()
            shown.extend(msg.tokens)
            if msg.HasField("summary"):
                summary = msg.summary
    assert summary is not None
    return [t.token_id for t in shown], shown, summary


def test_pd_device_chat_is_token_identical_to_generate(device: str, reference_model) -> None:  # type: ignore[no-untyped-def]
    tok, model = reference_model
    got, shown, s = chat(device, prompt=PROMPT, max_tokens=32, token_budget=24, tau_ms=15,
                         mode=pb.DEVICE_MODE_PD_DEVICE)
    assert got == generate_ref(model, tok.encode(PROMPT), 32)
    assert 1 <= s.handoff_index < 32 and not s.fallback
    assert [t.source for t in shown].count(pb.TOKEN_SOURCE_CLOUD) == s.handoff_index


def test_cli_chat_prints_ttft_tpot_and_handoff(device: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "services.cli", "device", "chat", PROMPT, "--address", device,
         "--raw", "--max-tokens", "12", "--budget", "8", "--mode", "pd_device"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ttft" in out.stderr and "paced tpot" in out.stderr and "hand-off" in out.stderr


def test_device_falls_back_when_the_cloud_is_killed_mid_stream(
        cloud: UpProcess, device: str, reference_model) -> None:  # type: ignore[no-untyped-def]
    tok, model = reference_model
    gateway = int(cloud.ready("gateway")["pid"])

    def kill_gateway() -> None:
        os.kill(gateway, signal.SIGKILL)  # a process this module started (via pdserve up)

    got, shown, s = chat(device, on_first=kill_gateway, prompt=PROMPT, max_tokens=40,
                         token_budget=40, tau_ms=40, mode=pb.DEVICE_MODE_PD_DEVICE)
    assert s.fallback and "local prefill" in s.fallback
    # Coherent and complete: the cloud's tokens up to the failure, then the device's.
    assert got == generate_ref(model, tok.encode(PROMPT), 40)
    assert any(t.source == pb.TOKEN_SOURCE_DEVICE for t in shown)
    assert s.cloud_tokens < 40
