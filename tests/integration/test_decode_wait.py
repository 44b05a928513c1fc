"""A full decode hands its next free slot to the request that waited longest: the gateway
asks every decode once, then waits at the best one (``wait_for_slot_ms``) instead of
asking again every 50 ms. Waiting requests stay token-identical, a cancelled waiter holds
nothing, and a decode that predates the field is still polled."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from pdserve.v1 import generation_service_pb2
from services.common import faultpoints
from services.gateway import servicer as gateway_servicer
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration
PROMPTS = [f"waiting for a decode slot, request {k}" for k in range(3)]


async def _quiet(c: Cluster) -> None:
    for _ in range(100):
        stats = await c.decode_stats()
        if sum(d.active + d.kv_bytes_held for d in stats) == 0 and \
                (await c.kv_stats()).bytes_held == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("KV or a decode slot still held")


async def test_waiters_get_freed_slots_in_turn(redis_url: str, tiny: Any,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _, tok, model = tiny
    monkeypatch.setattr(gateway_servicer, "DECODE_WAIT_S", 60.0)  # one wait, no re-ask
    async with Cluster(redis_url, decodes=1, worker_overrides={"slots": 1}) as c:
        # A waiter that goes away first: it must leave no slot or KV behind.
        faultpoints.install("decode.before_fetch=2")  # the first request holds the slot
        try:
            hog = asyncio.ensure_future(c.generate(prompt="holds the slot", max_tokens=8))
            gone = c.stub.Generate(generation_service_pb2.GenerateRequest(
                prompt="a waiter that gives up", max_tokens=8))
            reader = asyncio.ensure_future(gone.read())
            for _ in range(200):
                if (await c.decode_stats())[0].slot_waits_total:
                    break
                await asyncio.sleep(0.02)
            assert (await c.decode_stats())[0].slot_waits_total == 1
            gone.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            assert (await hog)[0]
        finally:
            faultpoints.install("")
        await _quiet(c)
        before = (await c.decode_stats())[0]

        got = await asyncio.gather(*(c.generate(prompt=p, max_tokens=24) for p in PROMPTS))
        for p, (ids, _, _) in zip(PROMPTS, got, strict=True):
            assert ids == reference(model, tok.encode(p), 24)
        d = (await c.decode_stats())[0]
        assert d.completed_total - before.completed_total == 3
        assert d.slot_waits_total - before.slot_waits_total >= 2
        # Refused at most once each (the first ask); then handed a slot, never re-polled.
        assert d.full_refusals_total - before.full_refusals_total <= len(PROMPTS)
        await _quiet(c)


async def test_a_decode_that_ignores_the_wait_is_polled(redis_url: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    async with Cluster(redis_url, decodes=1, worker_overrides={"slots": 1}) as c:
        _, servicer = c.decode_nodes[0]
        real = servicer._admit

        async def old_decode(request: Any, key: int) -> None:
            request.wait_for_slot_ms = 0  # as a decode built before the field
            await real(request, key)

        monkeypatch.setattr(servicer, "_admit", old_decode)
        got = await asyncio.gather(*(c.generate(prompt=p, max_tokens=12) for p in PROMPTS))
        assert all(len(ids) == 12 for ids, _, _ in got)
        d = (await c.decode_stats())[0]
        assert d.completed_total == 3 and d.slot_waits_total == 0
        await _quiet(c)


async def test_no_decode_frees_a_slot_in_time(redis_url: str) -> None:
    async with Cluster(redis_url, decodes=1, worker_overrides={"slots": 1},
                       gateway_overrides={"max_queue_s": 0.5}) as c:
        faultpoints.install("decode.before_fetch=3")  # the first request holds the slot
        try:
            hog = asyncio.ensure_future(c.generate(prompt="holds the only slot", max_tokens=8))
            for _ in range(200):
                if faultpoints.hits.get("decode.before_fetch"):
                    break
                await asyncio.sleep(0.02)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                await c.generate(prompt="finds no slot", max_tokens=8)
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "freed in time" in (exc.value.details() or "")
            ids, _, _ = await hog  # the slot's holder still finishes
            assert ids
        finally:
            faultpoints.install("")
        d = (await c.decode_stats())[0]
        assert d.slot_waits_total == 1 and d.completed_total == 1
        await _quiet(c)
