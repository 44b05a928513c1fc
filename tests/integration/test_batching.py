"""Continuous batching through the whole request path (tiny model): concurrent requests
of different lengths share decode steps and each stays identical to generate; a full KV
pool makes requests wait, not fail; cancels give every block back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from pdserve.v1 import generation_service_pb2
from services.decode import main as decode_main
from services.decode.main import DecodeConfig
from services.engine.worker import WorkerConfig
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration


async def _with_decode(cluster: Cluster, **overrides: object) -> tuple:  # type: ignore[type-arg]
    base = WorkerConfig(redis_url=cluster.redis_url, group=cluster.group, heartbeat_s=0.2,
                        registry_ttl_s=3.0, grace_s=0.5, model=cluster.model)
    cfg = replace(DecodeConfig.of(base), instance_id=f"bd-{cluster.group}", **overrides)
    node = await decode_main.start(cfg)
    for _, _, view in cluster.gateway_nodes:
        await view.refresh()
    return node


@pytest.fixture()
async def batched(redis_url: str) -> AsyncIterator[tuple[Cluster, decode_main.DecodeServicer]]:
    async with Cluster(redis_url, prefills=1, decodes=0,
                       worker_overrides={"slots": 8}) as c:
        rt, sv = await _with_decode(c, slots=8)
        try:
            yield c, sv
        finally:
            await decode_main.stop(rt, sv)


async def test_concurrent_mixed_lengths_share_steps_and_stay_identical(
    batched: tuple[Cluster, decode_main.DecodeServicer], tiny  # type: ignore[no-untyped-def]
) -> None:
    cluster, decode = batched
    _, tok, model = tiny
    prompts = [("word " * (3 + 11 * i))[: 4 + 23 * i] for i in range(8)]
    lengths = [30, 5, 22, 12, 30, 8, 17, 26]
    results = await asyncio.gather(*(cluster.generate(prompt=p, max_tokens=n)
                                     for p, n in zip(prompts, lengths, strict=True)))
    for p, n, (got, _, _) in zip(prompts, lengths, results, strict=True):
        assert got == reference(model, tok.encode(p), n)
    assert decode.steps.max_batch >= 2  # they really shared forwards
    assert decode.steps.tokens_total > decode.steps.steps_total
    assert decode.pool.used_blocks == 0 and decode.pool.owners() == []
    assert (await cluster.kv_stats()).bytes_held == 0


async def test_a_full_pool_makes_requests_wait_not_fail(redis_url: str, tiny) -> None:  # type: ignore[no-untyped-def]
    """Blocks are reserved before the KV moves: a request that does not fit is refused
    before any transfer, the gateway retries, and it runs once blocks are freed."""
    _, tok, model = tiny
    async with Cluster(redis_url, prefills=1, decodes=0,
                       worker_overrides={"slots": 4}) as cluster:
        # 64 slots: one request (~20 prompt + 40 new tokens) at a time.
        rt, decode = await _with_decode(cluster, slots=4, kv_pool_tokens=64,
                                        kv_pool_block_tokens=16)
        try:
            prompts = [f"pool test {i}!" for i in range(3)]
            results = await asyncio.gather(*(cluster.generate(prompt=p, max_tokens=40)
                                             for p in prompts))
            for p, (got, _, _) in zip(prompts, results, strict=True):
                assert got == reference(model, tok.encode(p), 40)
            assert decode.steps.max_batch == 1
            assert decode.pool.used_blocks == 0
        finally:
            await decode_main.stop(rt, decode)


async def test_cancel_mid_stream_frees_every_block(
    batched: tuple[Cluster, decode_main.DecodeServicer],
) -> None:
    cluster, decode = batched
    streams = [cluster.stub.Generate(generation_service_pb2.GenerateRequest(
        prompt=f"cancel me {i}", max_tokens=200)) for i in range(3)]
    for s in streams:
        got = 0
        async for msg in s:
            got += len(msg.token_ids)
            if got >= 3:  # past the first token: decoding, its blocks held
                break
    assert decode.pool.used_blocks > 0
    for s in streams:
        s.cancel()
    for _ in range(200):
        if decode.pool.used_blocks == 0 and not decode.active:
            break
        await asyncio.sleep(0.02)
    assert decode.pool.used_blocks == 0 and decode.pool.owners() == []
    for _ in range(100):
        if (await cluster.kv_stats()).bytes_held == 0:
            break
        await asyncio.sleep(0.05)
    assert (await cluster.kv_stats()).bytes_held == 0


async def test_a_shared_prefix_hits_the_prefill_cache_and_stays_identical(
    batched: tuple[Cluster, decode_main.DecodeServicer], tiny  # type: ignore[no-untyped-def]
) -> None:
    cluster, _ = batched
    _, tok, model = tiny
    prefill = cluster.prefill_nodes[0][1]
    system = "You are a careful assistant who answers briefly and exactly. " * 3
    before = prefill.load()["prefix_saved_tokens"]
    for q in ("What is two plus two?", "Name a colour."):
        got, _, _ = await cluster.generate(prompt=system + q, max_tokens=12)
        assert got == reference(model, tok.encode(system + q), 12)
    load = prefill.load()
    assert load["prefix_hits"] >= 1 and load["prefix_saved_tokens"] - before >= 64
