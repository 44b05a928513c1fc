"""The data plane in the in-process cluster: each transport and mode is token-identical to
in-process generate; every injected fault ends the request with a clear status, never a
hang, and leaves zero KV bytes held; fallback shows in timings, stats and load."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from services.common.errors import error_info
from services.kv.rdma import mooncake_importable
from services.kvstore.faults import Faults
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration
PROMPT = "The quick brown fox jumps over the lazy dog. " * 3
RDMA_TCP = {"kv_transports": "rdma,tcp", "kv_rdma_tcp_mode": True}
LAYERED = {"kv_transports": "tcp", "kv_layer_overlap": True}


async def _identical(cluster: Cluster, tiny, max_tokens: int = 12) -> str:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    got, _, last = await cluster.generate(prompt=PROMPT, max_tokens=max_tokens)
    assert got == reference(model, tok.encode(PROMPT), max_tokens)
    assert not last.timings.kv_fallback
    assert (await cluster.kv_stats()).bytes_held == 0
    return last.timings.kv_transport


@pytest.mark.parametrize(("name", "kv", "want"), [
    ("tcp", {"kv_transports": "tcp"}, "tcp"),
    ("tcp-block16", {"kv_transports": "tcp", "kv_transfer_mode": "block"}, "tcp"),
    ("tcp-layer-overlap", LAYERED, "tcp"),
    ("shm", {}, "shm"),
    pytest.param("rdma-via-mooncake-tcp", RDMA_TCP, "rdma/tcp", marks=pytest.mark.skipif(
        not mooncake_importable(), reason="Mooncake not installed (scripts/bootstrap.sh)")),
])
async def test_each_transport_is_token_identical(redis_url: str, tiny, name: str,  # type: ignore[no-untyped-def]
                                                 kv: dict[str, object], want: str) -> None:
    async with Cluster(redis_url, worker_overrides=kv, kvstore_overrides=kv) as c:
        assert await _identical(c, tiny) == want
        stats = await c.kv_stats()
        path = want.partition("/")[0]
        assert stats.transfers[f"{path}.put.ok"] == 1 and stats.transfers[f"{path}.get.ok"] == 1
        # Per-layer transfer: the layers went during compute, the header (crc) last.
        assert stats.transfers["tcp.put.layered"] == (1 if name == "tcp-layer-overlap" else 0)
        if path == "shm":  # decode released the mapping after its RecvScatter: pooled again
            assert stats.transfers["shm.get.released"] == 1
            assert await _identical(c, tiny) == "shm"
            assert c.kvstore.pool.reused >= 1  # the second push landed in the pooled memfd


@pytest.fixture(scope="module")
async def faulty(redis_url: str) -> AsyncIterator[Cluster]:
    # A short transfer budget so stalls end quickly (first attempt 1 s, tcp retry 1 s).
    async with Cluster(redis_url, worker_overrides={"kv_transfer_timeout_s": 2.0}) as c:
        yield c


async def _fails(c: Cluster, faults: str, code: grpc.StatusCode, reason: str) -> None:
    c.kvstore.data.faults = Faults.parse(faults)
    try:
        async with asyncio.timeout(20):  # never a hang
            with pytest.raises(grpc.aio.AioRpcError) as ei:
                await c.generate(prompt=PROMPT, max_tokens=6)
    finally:
        c.kvstore.data.faults = Faults()
    assert ei.value.code() == code, ei.value.details()
    assert error_info(ei.value).reason == reason  # type: ignore[union-attr]
    await _no_leak(c)


async def _no_leak(c: Cluster) -> None:
    for _ in range(50):  # releases run as the streams unwind
        stats = await c.kv_stats()
        if stats.bytes_held == 0 and stats.entries == 0:
            break
        await asyncio.sleep(0.05)
    assert stats.bytes_held == 0 and stats.entries == 0, "KV bytes leaked"
    assert all(d.kv_bytes_held == 0 and d.active == 0 for d in await c.decode_stats())


@pytest.mark.parametrize(("faults", "code", "reason"), [
    ("drop_put", grpc.StatusCode.UNAVAILABLE, "KV_TRANSFER_FAILED"),
    ("drop_get", grpc.StatusCode.UNAVAILABLE, "KV_FETCH_FAILED"),
    ("corrupt_header", grpc.StatusCode.ABORTED, "KV_CORRUPT"),
    ("corrupt_payload", grpc.StatusCode.ABORTED, "KV_CORRUPT"),
    ("stall_put", grpc.StatusCode.DEADLINE_EXCEEDED, "KV_TRANSFER_TIMEOUT"),
    ("stall_get", grpc.StatusCode.DEADLINE_EXCEEDED, "KV_TRANSFER_TIMEOUT"),
])
async def test_injected_fault_ends_clearly_without_leak(faulty: Cluster, faults: str,
                                                        code: grpc.StatusCode,
                                                        reason: str) -> None:
    await _fails(faulty, faults, code, reason)


async def test_fallback_is_visible_everywhere(faulty: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    faulty.kvstore.data.faults = Faults.parse("drop_put@shm#1")
    got, _, last = await faulty.generate(prompt=PROMPT, max_tokens=8)
    assert got == reference(model, tok.encode(PROMPT), 8)
    t = last.timings
    assert t.kv_fallback and t.kv_transport == "tcp>shm"  # push fell back, fetch took shm
    stats = await faulty.kv_stats()
    assert stats.transfers["tcp.put.fallback"] >= 1 and stats.transfers["shm.put.failed"] >= 1
    load = faulty.prefill_nodes[0][1].load()  # what the scheduler reads from Redis
    assert load["kv_fallbacks"] >= 1 and load["kv_fallback_rate"] > 0
    await _no_leak(faulty)


async def test_layered_push_that_breaks_falls_back_to_a_whole_push(redis_url: str,
                                                                    tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    async with Cluster(redis_url, worker_overrides=LAYERED, kvstore_overrides=LAYERED) as c:
        c.kvstore.data.faults = Faults.parse("drop_put#1")  # breaks the layered stream
        got, _, last = await c.generate(prompt=PROMPT, max_tokens=8)
        assert got == reference(model, tok.encode(PROMPT), 8)
        assert last.timings.kv_fallback
        stats = await c.kv_stats()
        assert stats.transfers["tcp.put.layered"] == 1
        assert stats.transfers["tcp.put.fallback"] == 1 and stats.transfers["tcp.put.ok"] == 1
        await _no_leak(c)


async def test_fault_is_not_sticky(faulty: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    await _fails(faulty, "drop_put", grpc.StatusCode.UNAVAILABLE, "KV_TRANSFER_FAILED")
    assert await _identical(faulty, tiny) == "shm"  # the next request takes shm again


async def test_kv_over_the_cap_is_refused_without_leak(faulty: Cluster) -> None:
    store = faulty.kvstore.store
    cap, store.capacity_bytes = store.capacity_bytes, 1024
    try:
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await faulty.generate(prompt=PROMPT, max_tokens=4)
    finally:
        store.capacity_bytes = cap
    assert ei.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await _no_leak(faulty)


async def test_fallback_forbidden_fails_fast(redis_url: str) -> None:
    async with Cluster(redis_url, worker_overrides={"kv_fallback": False}) as c:
        await _fails(c, "refuse_shm", grpc.StatusCode.UNAVAILABLE, "KV_TRANSFER_FAILED")


async def test_dead_data_plane_is_unavailable_not_a_hang(redis_url: str) -> None:
    async with Cluster(redis_url) as c:
        await c.kvstore.data.close()  # the kvstore's data plane is gone; control still up
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            async with asyncio.timeout(20):
                await c.generate(prompt=PROMPT, max_tokens=4)
        assert ei.value.code() == grpc.StatusCode.UNAVAILABLE
        # Its Unix socket is gone too, so shm is not even planned: tcp is tried and fails.
        assert "cannot connect to data channel" in ei.value.details()
        await _no_leak(c)
