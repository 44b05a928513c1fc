"""Failure paths end with a clear status and leak no KV."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from pdserve.v1 import (
    common_pb2,
    decode_service_pb2,
    decode_service_pb2_grpc,
    kvstore_service_pb2,
    kvstore_service_pb2_grpc,
)
from services.common.errors import error_info
from services.kv import TcpTransport
from services.kv.layout import HEADER_BYTES
from tests.cluster import Cluster

pytestmark = pytest.mark.integration


async def _stage(cluster: Cluster, rid: str, buf: np.ndarray) -> common_pb2.KvRef:
    async with grpc.aio.insecure_channel(cluster.kvstore.runtime.address) as ch:
        stub = kvstore_service_pb2_grpc.KvStoreServiceStub(ch)
        res = await stub.ReserveKv(kvstore_service_pb2.ReserveKvRequest(
            request_id=rid, nbytes=buf.nbytes))
    await TcpTransport().put(res.data_address, res.handle, rid, memoryview(buf))
    return common_pb2.KvRef(handle=res.handle, control_address=cluster.kvstore.runtime.address,
                            data_address=res.data_address, transport="tcp", nbytes=buf.nbytes)


async def _decode(cluster: Cluster, rid: str, kv: common_pb2.KvRef) -> grpc.aio.AioRpcError:
    rt, _ = cluster.decode_nodes[0]
    async with grpc.aio.insecure_channel(rt.address) as ch:
        stub = decode_service_pb2_grpc.DecodeServiceStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in stub.Decode(decode_service_pb2.DecodeRequest(
                    request_id=rid, kv=kv, first_token_id=5, max_new_tokens=4)):
                pass
    return exc.value


def _packed(cluster: Cluster, fingerprint: str | None = None) -> np.ndarray:
    import torch
    from transformers import DynamicCache

    from services.engine.kv import pack_kv

    runner = cluster.decode_nodes[0][1].runner
    cfg = runner.config
    shape = (1, cfg.num_key_value_heads, 6, cfg.hidden_size // cfg.num_attention_heads)
    layers = [(torch.randn(shape), torch.randn(shape)) for _ in range(cfg.num_hidden_layers)]
    cache = DynamicCache(ddp_cache_data=layers, config=cfg)
    return pack_kv(cache, fingerprint or runner.fingerprint)[1]


async def test_kv_from_another_model_is_refused(cluster: Cluster) -> None:
    kv = await _stage(cluster, "mm-1", _packed(cluster, fingerprint="0" * 64))
    err = await _decode(cluster, "mm-1", kv)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert error_info(err).reason == "KV_MODEL_MISMATCH"  # type: ignore[union-attr]
    assert "same model" in err.details()
    assert (await cluster.kv_stats()).bytes_held == 0


async def test_corrupted_kv_is_detected_never_decoded(cluster: Cluster) -> None:
    buf = _packed(cluster)
    buf[HEADER_BYTES + 100] ^= 0xFF
    kv = await _stage(cluster, "bad-1", buf)
    err = await _decode(cluster, "bad-1", kv)
    assert err.code() == grpc.StatusCode.ABORTED
    assert error_info(err).reason == "KV_CORRUPT"  # type: ignore[union-attr]
    stats = await cluster.decode_stats()
    assert all(d.active == 0 for d in stats)


async def test_a_guessed_handle_reads_nothing(cluster: Cluster) -> None:
    kv = await _stage(cluster, "owner-1", _packed(cluster))
    err = await _decode(cluster, "thief-1", kv)  # right handle, other request
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(err).reason == "KV_FETCH_FAILED"  # type: ignore[union-attr]
    async with grpc.aio.insecure_channel(cluster.kvstore.runtime.address) as ch:
        stub = kvstore_service_pb2_grpc.KvStoreServiceStub(ch)
        res = await stub.ReleaseKv(kvstore_service_pb2.ReleaseKvRequest(
            handle=kv.handle, request_id="owner-1", reason="test"))
    assert res.previous_state == kvstore_service_pb2.KV_STATE_READY  # still the owner's
    assert (await cluster.kv_stats()).bytes_held == 0


async def test_kv_larger_than_the_kvstore_fails_fast(redis_url: str) -> None:
    async with Cluster(redis_url, kvstore_overrides={"capacity_bytes": 1024}) as c:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.generate(prompt="this KV will not fit", max_tokens=4)
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(exc.value).reason == "KV_TOO_LARGE"  # type: ignore[union-attr]
        stats = await c.kv_stats()
        assert stats.rejected_total == 1 and stats.bytes_held == 0
        prefill = (await c.prefill_stats())[0]
        assert prefill.busy_slots == 0 and prefill.failed_total == 1


async def test_no_decode_is_unavailable_and_the_kv_is_released(redis_url: str) -> None:
    async with Cluster(redis_url, decodes=0) as c:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.generate(prompt="nobody decodes this", max_tokens=4)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(exc.value).reason == "NO_DECODE"  # type: ignore[union-attr]
        for _ in range(50):
            stats = await c.kv_stats()
            if stats.bytes_held == 0:
                break
            await asyncio.sleep(0.05)
        assert stats.bytes_held == 0 and stats.aborted_total == 1


async def test_a_dead_but_still_registered_kvstore_fails_requests_at_once(redis_url: str) -> None:
    async with Cluster(redis_url, prefills=2) as c:
        await c.kvstore.runtime.server.stop(0)  # gone, but its lease has not expired yet
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.generate(prompt_token_ids=[5] * 20, max_tokens=2)  # no TTFT deadline
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(exc.value).reason == "KVSTORE_UNAVAILABLE"  # type: ignore[union-attr]
        assert "kvstore" in (exc.value.details() or "")
        assert loop.time() - t0 < 15  # not parked in the forwarding queue (max_queue_s = 60)
        assert await c.gateway[1].admission.queue.depth(c.group) == 0  # type: ignore[union-attr]
