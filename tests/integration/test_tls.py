"""TLS at the gateway's two doors, in process: a CA-signed server certificate for gRPC
and HTTP, and mutual TLS (--tls-client-ca) that refuses a client without a certificate
the CA signed, on both doors."""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc
import httpx
import pytest

from pdserve.v1 import generation_service_pb2 as gen_pb
from pdserve.v1 import generation_service_pb2_grpc as gen_grpc
from services.gateway.main import GatewayRuntime
from tests.certs import Pem, issue, make_ca
from tests.cluster import Cluster

pytestmark = pytest.mark.integration


def _door(c: Cluster) -> tuple[str, str]:
    rt = c.gateway_nodes[0][0]
    assert isinstance(rt, GatewayRuntime) and rt.http is not None
    return rt.address, f"https://127.0.0.1:{rt.http.port}"


async def _grpc_ok(address: str, ca: Pem, client: Pem | None) -> list[int]:
    creds = grpc.ssl_channel_credentials(
        ca.cert.read_bytes(), client.key.read_bytes() if client else None,
        client.cert.read_bytes() if client else None)
    async with grpc.aio.secure_channel(address, creds) as ch:
        ids: list[int] = []
        async for msg in gen_grpc.GenerationServiceStub(ch).Generate(
                gen_pb.GenerateRequest(prompt_token_ids=[5] * 8, max_tokens=3), timeout=30):
            ids.extend(msg.token_ids)
        return ids


def _ctx(ca: Pem, client: Pem | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    if client is not None:
        ctx.load_cert_chain(str(client.cert), str(client.key))
    return ctx


async def test_tls_on_both_doors(redis_url: str, tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    server = issue(tmp_path, ca, "gateway")
    tls = {"tls_cert": str(server.cert), "tls_key": str(server.key)}
    async with Cluster(redis_url, gateway_overrides=tls) as c:
        address, base = _door(c)
        assert len(await _grpc_ok(address, ca[0], None)) == 3
        async with httpx.AsyncClient(verify=_ctx(ca[0], None)) as http:
            r = await http.post(base + "/v1/completions", json={"prompt": [5] * 8,
                                                                "max_tokens": 3})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
        # A client that does not trust the CA refuses the server.
        async with httpx.AsyncClient() as http:
            with pytest.raises(httpx.ConnectError):
                await http.get(base + "/health")


async def test_mutual_tls_requires_a_client_certificate(redis_url: str, tmp_path: Path) -> None:
    ca = make_ca(tmp_path)
    server = issue(tmp_path, ca, "gateway")
    client = issue(tmp_path, ca, "client", client=True)
    other = tmp_path / "other"
    other.mkdir()
    stranger = issue(other, make_ca(other, "other-ca"), "stranger", client=True)
    tls = {"tls_cert": str(server.cert), "tls_key": str(server.key),
           "tls_client_ca": str(ca[0].cert)}
    async with Cluster(redis_url, gateway_overrides=tls) as c:
        address, base = _door(c)
        assert len(await _grpc_ok(address, ca[0], client)) == 3
        for who in (None, stranger):
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await _grpc_ok(address, ca[0], who)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake failed
        async with httpx.AsyncClient(verify=_ctx(ca[0], client)) as http:
            assert (await http.get(base + "/v1/models")).status_code == 200
        for who in (None, stranger):
            async with httpx.AsyncClient(verify=_ctx(ca[0], who)) as http:
                with pytest.raises((httpx.ConnectError, httpx.ReadError,
                                    httpx.RemoteProtocolError)):
                    await http.get(base + "/v1/models")
