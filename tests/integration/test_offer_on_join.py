"""A prefill that joins a group offers its free slots at once: requests already waiting in
the group's forwarding queue are served by it without waiting for a slot to free
elsewhere or for a gateway's safety poll (set to 60 s here, so only an offer can wake
them)."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from pdserve.v1 import generation_service_pb2
from services.engine.worker import WorkerConfig
from services.prefill import main as prefill_main
from tests.cluster import Cluster

pytestmark = pytest.mark.integration


async def _first_token(c: Cluster, ids: list[int], order: list[str], name: str) -> None:
    async for msg in c.stub.Generate(generation_service_pb2.GenerateRequest(
            prompt_token_ids=ids, max_tokens=2), timeout=60):
        if msg.token_ids:
            order.append(name)
            return


async def test_a_joining_prefill_serves_the_waiting_queue_at_once(redis_url: str) -> None:
    slow = {"slots": 1, "emulate_prefill_ms_per_token": 8.0}  # 800 tokens ~ 6.4 s
    async with Cluster(redis_url, prefills=1, worker_overrides=slow,
                       gateway_overrides={"queue_poll_s": 60.0}) as c:
        order: list[str] = []
        busy = asyncio.create_task(_first_token(c, [5] * 800, order, "long"))
        await asyncio.sleep(0.3)  # the only slot is taken
        waiting = asyncio.create_task(_first_token(c, [6] * 20, order, "short"))
        admission = c.gateway[1].admission
        for _ in range(100):  # the short one is parked in the group's queue
            if admission.stats.queued_total >= 1:
                break
            await asyncio.sleep(0.05)
        assert admission.stats.queued_total >= 1
        base = dict(redis_url=redis_url, group=c.group, heartbeat_s=0.2, registry_ttl_s=3.0,
                    grace_s=0.5, model="tiny", slots=1)
        joined = await prefill_main.start(replace(WorkerConfig(**base),
                                                  instance_id=f"p-join-{c.group}"))
        try:
            await asyncio.wait_for(waiting, 30)
            await busy
        finally:
            await prefill_main.stop(*joined)
        # Served by the newcomer's offer while the long prefill still held the old slot.
        assert order == ["short", "long"], order
        assert joined[1].stats.accepted_total == 1
