"""Reliability through in-process services: internal identity, bounded input, KV released
right after a cancel in every handoff window (held there on purpose by fault points),
and internal calls that are bounded and authenticated."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator

import grpc
import pytest

from pdserve.v1 import (
    common_pb2,
    decode_service_pb2,
    decode_service_pb2_grpc,
    generation_service_pb2,
    kvstore_service_pb2,
    kvstore_service_pb2_grpc,
)
from services.common import faultpoints
from services.common.errors import error_info
from services.gateway import servicer as gateway_servicer
from services.kv.wire import MAGIC, REQ, VERSION
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def one_decode(redis_url: str) -> AsyncIterator[Cluster]:
    """One prefill, one decode: same-id requests meet in the same block table dict."""
    async with Cluster(redis_url, prefills=1, decodes=1,
                       kvstore_overrides={"model": "tiny", "max_lease_s": 60.0}) as c:
        yield c


async def _kv_idle(c: Cluster, within_s: float) -> tuple[int, float]:
    """Wait until the kvstore holds nothing and no decode is active; (bytes, seconds)."""
    t0 = time.monotonic()
    while True:
        held = (await c.kv_stats()).bytes_held
        active = sum(d.active for d in await c.decode_stats())
        if (held == 0 and active == 0) or time.monotonic() - t0 > within_s:
            return held + active, time.monotonic() - t0
        await asyncio.sleep(0.02)


async def test_same_client_request_id_concurrently_never_shares_state(
        one_decode: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    jobs = [("dup", "The first of two requests with one id: " * 2, 20),
            ("dup", "A second, longer request that shares that id " * 2, 70),
            ("other", "Something unrelated to fill the freed blocks " * 3, 60),
            ("dup", "A third with the same id, started last", 40)]

    async def one(rid: str, prompt: str, n: int, delay: float) -> tuple[list[int], str]:
        await asyncio.sleep(delay)
        ids, _, last = await one_decode.generate(prompt=prompt, max_tokens=n, request_id=rid)
        return ids, last.request_id

    got = await asyncio.gather(*(one(r, p, n, 0.05 * i) for i, (r, p, n) in enumerate(jobs)))
    for (rid, prompt, n), (ids, echoed) in zip(jobs, got, strict=True):
        assert ids == reference(model, tok.encode(prompt), n), f"{rid!r} diverged from greedy"
        assert echoed == rid  # the client's id is echoed as a label
    assert await _kv_idle(one_decode, 2.0) == (0, pytest.approx(0, abs=2.0))


async def test_non_ascii_request_id_is_served(one_decode: Cluster) -> None:
    ids, _, last = await one_decode.generate(prompt="hello", max_tokens=4, request_id="café ✓")
    assert len(ids) == 4 and last.request_id == "café ✓"


@pytest.mark.parametrize("kw", [
    {"request_id": "r" * 20_000}, {"request_id": "q" * 70_000}, {"request_id": "bad\nid"},
    {"model": "\u200d" * 1500}, {"scenario": "s" * 20_000}, {"stop": ["x" * 5000]},
    {"stop": ["a"] * 40},
], ids=["rid-20k", "rid-70k", "rid-newline", "model-zwj", "scenario-20k", "stop-5k",
        "stop-40"])
async def test_oversized_user_strings_get_invalid_argument_with_error_info(
        one_decode: Cluster, kw: dict[str, object]) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await one_decode.generate(prompt="hi", max_tokens=2, **kw)
    err = exc.value
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert error_info(err) is not None
    assert len(err.details() or "") < 400


async def test_a_tiny_temperature_is_greedy(one_decode: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    ids, _, _ = await one_decode.generate(prompt="Tiny temperature", max_tokens=12,
                                          temperature=1e-45)
    assert ids == reference(model, tok.encode("Tiny temperature"), 12)


async def test_a_long_text_prompt_is_tokenized_off_the_event_loop(
        one_decode: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = gateway_servicer.validate

    def spy(*a, **kw):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(gateway_servicer, "validate", spy)
    with pytest.raises(grpc.aio.AioRpcError):  # 5,000 tokens: over the tiny model's context
        await one_decode.generate(prompt="word " * 1000, max_tokens=1)
    await one_decode.generate(prompt="short", max_tokens=1)
    main = threading.main_thread().name
    assert threads[0] != main and threads[1] == main


# -- every handoff window: cancel there on purpose, and nothing stays held -------------------

WINDOWS = ["kvstore.reserve", "prefill.before_reserve", "prefill.after_reserve",
           "prefill.after_push", "prefill.after_kv_ready", "gateway.before_kv_read",
           "gateway.before_decode",
           "decode.before_fetch"]
PAUSE_S = 1.5


async def cancel_at(c: Cluster, point: str) -> None:
    """Send a request, hold it at fault point ``point`` and cancel it there."""
    faultpoints.install(f"{point}=0.6")
    try:
        call = c.stub.Generate(generation_service_pb2.GenerateRequest(
            prompt="window " * 20, max_tokens=8))
        reader = asyncio.ensure_future(call.read())
        t0 = time.monotonic()
        while not faultpoints.hits.get(point) and time.monotonic() - t0 < 10:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        assert faultpoints.hits.get(point), f"never reached {point}"
        call.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    finally:
        faultpoints.install("")


@pytest.mark.parametrize("point", WINDOWS)
async def test_cancel_in_each_handoff_window_holds_no_kv(one_decode: Cluster,
                                                         point: str) -> None:
    await cancel_at(one_decode, point)
    # Zero right after the pause ends (the lease is 30 s): not freed by the sweeper.
    held, took = await _kv_idle(one_decode, PAUSE_S + 1.0)
    assert held == 0, f"{held} bytes still held {took:.1f} s after a cancel at {point}"
    assert (await one_decode.kv_stats()).expired_total == 0


async def test_kvstore_caps_lease_and_size(one_decode: Cluster) -> None:
    async with grpc.aio.insecure_channel(one_decode.kvstore.runtime.address) as ch:
        stub = kvstore_service_pb2_grpc.KvStoreServiceStub(ch)
        res = await stub.ReserveKv(kvstore_service_pb2.ReserveKvRequest(
            request_id="greedy-lease", nbytes=1000, lease_ms=2**32 - 1))
        assert res.lease_expires_unix_ms <= (time.time() + 61) * 1000  # max_lease_s = 60
        await stub.ReleaseKv(kvstore_service_pb2.ReleaseKvRequest(handle=res.handle,
                                                                  request_id="greedy-lease"))
        with pytest.raises(grpc.aio.AioRpcError) as exc:  # the whole capacity
            await stub.ReserveKv(kvstore_service_pb2.ReserveKvRequest(
                request_id="greedy-size", nbytes=one_decode.kvstore.cfg.capacity_bytes))
        assert error_info(exc.value).reason == "KV_RESERVATION_TOO_LARGE"  # type: ignore[union-attr]
    assert (await one_decode.kv_stats()).bytes_held == 0


async def test_a_forged_kvref_never_makes_decode_connect(one_decode: Cluster) -> None:
    trap = socket.socket()
    trap.bind(("127.0.0.1", 0))
    trap.listen(4)
    trap.setblocking(False)
    addr = f"127.0.0.1:{trap.getsockname()[1]}"
    kv = common_pb2.KvRef(handle="ab" * 16, data_address=addr, control_address=addr,
                          transport="tcp", num_tokens=4, endpoints=[
                              common_pb2.KvEndpoint(transport="tcp", address=addr)])
    rt, _ = one_decode.decode_nodes[0]
    try:
        async with grpc.aio.insecure_channel(rt.address) as ch:
            stub = decode_service_pb2_grpc.DecodeServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in stub.Decode(decode_service_pb2.DecodeRequest(
                        request_id="forger", kv=kv, first_token_id=5, max_new_tokens=4)):
                    pass
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(exc.value).reason == "KVSTORE_NOT_REGISTERED"  # type: ignore[union-attr]
        with pytest.raises(BlockingIOError):
            trap.accept()  # nobody dialled the caller's address
    finally:
        trap.close()
    assert sum(d.active + d.kv_bytes_held for d in await one_decode.decode_stats()) == 0


async def test_data_channel_idle_timeout_and_per_peer_limit(redis_url: str) -> None:
    from services.kvstore.main import KvStoreConfig, KvStoreService

    svc = KvStoreService(KvStoreConfig(redis_url=redis_url, group="idle-test",
                                       data_idle_s=0.3, data_max_conns_per_peer=2,
                                       kv_transports="tcp"))
    await svc.start()
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", svc.data.port))
            s.setblocking(False)
            socks.append(s)
        # The third is over the per-peer limit: closed on accept.
        assert await asyncio.wait_for(loop.sock_recv(socks[2], 16), 2) == b""
        # The first two never send a header: closed after data_idle_s (0.3 s), well inside
        # the 5 s this waits, where the transfer bound (60 s) would not have closed them.
        for s in socks[:2]:
            assert await asyncio.wait_for(loop.sock_recv(s, 16), 5) == b""
        # A header with a 65,535-byte request id is a protocol error, not a 64 KiB read.
        s = socket.create_connection(("127.0.0.1", svc.data.port))
        s.setblocking(False)
        socks.append(s)
        await loop.sock_sendall(s, REQ.pack(MAGIC, VERSION, 1, 0, b"\0" * 16, 65535, 10, 0))
        assert (await asyncio.wait_for(loop.sock_recv(s, 1), 5)) == b"\x04"  # PROTOCOL
        assert svc.data.counters["refused.per_peer_limit"] == 1
    finally:
        for s in socks:
            s.close()
        await svc.stop()


async def test_internal_calls_need_the_cluster_token(redis_url: str, tiny) -> None:  # type: ignore[no-untyped-def]
    token = {"cluster_token": "t0ken-for-tests"}
    async with Cluster(redis_url, kvstore_overrides=token, worker_overrides=token,
                       gateway_overrides=token) as c:
        ids, _, _ = await c.generate(prompt="with a token", max_tokens=3)  # inside: carried
        assert len(ids) == 3
        targets = [c.kvstore.runtime.address, c.prefill_nodes[0][0].address,
                   c.decode_nodes[0][0].address]
        for md in [(), (("x-pdserve-cluster-token", "wrong"),)]:
            async with grpc.aio.insecure_channel(targets[0]) as ch:
                stub = kvstore_service_pb2_grpc.KvStoreServiceStub(ch)
                with pytest.raises(grpc.aio.AioRpcError) as exc:
                    await stub.ReserveKv(kvstore_service_pb2.ReserveKvRequest(
                        request_id="intruder", nbytes=10), metadata=md)
                assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
                stats = await stub.GetKvStoreStats(kvstore_service_pb2.GetKvStoreStatsRequest())
                assert stats.reserved_total == 1  # only the real request reserved
        async with grpc.aio.insecure_channel(targets[2]) as ch:
            dstub = decode_service_pb2_grpc.DecodeServiceStub(ch)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                async for _ in dstub.Decode(decode_service_pb2.DecodeRequest(
                        request_id="intruder", kv=common_pb2.KvRef(handle="ab" * 16))):
                    pass
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
