"""The device as a client of a gateway that demands TLS and an API key: it dials through
its WAN relay, checks the gateway's certificate under the gateway's own name, sends the
key, and its answers equal greedy ``generate``. A wrong key is a visible fallback with
the gateway's status, never a silent success."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from pdserve.v1 import device_service_pb2 as pb
from pdserve.v1 import device_service_pb2_grpc as pb_grpc
from services.common.config import ConfigError
from services.device import main as device_main
from tests.certs import issue, make_ca
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration
PROMPT = "Hello there, how are you today?"


async def _chat(cfg: device_main.DeviceConfig, mode: int) -> tuple[list[int], pb.ChatSummary]:
    handles = await device_main.start(cfg)
    try:
        async with grpc.aio.insecure_channel(handles[0].address) as ch:
            ids: list[int] = []
            summary = None
            async for msg in pb_grpc.DeviceServiceStub(ch).Chat(
                    pb.ChatRequest(prompt=PROMPT, max_tokens=10, mode=mode), timeout=60):
                ids.extend(t.token_id for t in msg.tokens)
                if msg.HasField("summary"):
                    summary = msg.summary
            assert summary is not None
            return ids, summary
    finally:
        await device_main.stop(*handles)


@pytest.fixture
async def secure(redis_url: str, tmp_path: Path) -> AsyncIterator[tuple[Cluster, str]]:
    ca = make_ca(tmp_path)
    server = issue(tmp_path, ca, "gateway")
    tls = {"tls_cert": str(server.cert), "tls_key": str(server.key), "api_key": "k1"}
    async with Cluster(redis_url, gateway_overrides=tls) as c:
        yield c, str(ca[0].cert)


async def test_device_speaks_tls_and_api_key_to_the_gateway(
        secure: tuple[Cluster, str], tiny) -> None:  # type: ignore[no-untyped-def]
    c, ca = secure
    _, tok, model = tiny
    want = reference(model, tok.encode(PROMPT), 10)
    # "localhost" is in the certificate; the relay's 127.0.0.1:port is not what is checked.
    address = "localhost:" + c.gateway[0].address.rpartition(":")[2]
    cfg = device_main.DeviceConfig(model="tiny", cloud_address=address, cloud_tls_ca=ca,
                                   cloud_api_key="k1", wan_rtt_ms=10.0, speed_factor=20.0)
    for mode in (pb.DEVICE_MODE_CLOUD_ONLY, pb.DEVICE_MODE_PD_DEVICE):
        ids, s = await _chat(cfg, mode)
        assert ids == want and not s.fallback, pb.DeviceMode.Name(mode)
        assert s.cloud_tokens >= 1


async def test_a_wrong_key_is_a_visible_fallback(
        secure: tuple[Cluster, str], tiny) -> None:  # type: ignore[no-untyped-def]
    # A device 80x slower than this host takes ~1 s to prefill the prompt, so the refusal
    # (ms) is always first. A device that is faster than the refusal takes over and
    # cancels the call first; CI once saw that race here as an empty fallback. The order
    # "refused after the hand-off" is pinned in tests/unit/test_device_cloud_refusal.py.
    c, ca = secure
    _, tok, model = tiny
    cfg = device_main.DeviceConfig(model="tiny", cloud_address=c.gateway[0].address,
                                   cloud_tls_ca=ca, cloud_api_key="wrong", speed_factor=80.0)
    ids, s = await _chat(cfg, pb.DEVICE_MODE_PD_DEVICE)
    assert ids == reference(model, tok.encode(PROMPT), 10)  # the device answers alone
    assert "UNAUTHENTICATED" in s.fallback and s.cloud_tokens == 0


def test_a_missing_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cloud_tls_ca"):
        device_main.DeviceConfig(model="tiny", cloud_tls_ca=str(tmp_path / "nope.pem"))
