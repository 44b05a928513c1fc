"""Degrade, don't fail, when Redis is away: a real redis-server that this test starts,
SIGKILLs and restarts (its own, not the session's), under a real in-process cluster.

While Redis is down the gateway routes from its last view, the forwarding queue waits
gateway-locally, and every request gets its tokens; with no reachable prefill the answer
is UNAVAILABLE, never UNKNOWN. When Redis returns, every instance re-registers at its
next heartbeat and the queue resyncs; both times are measured and printed."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
import uuid
from collections.abc import Iterator

import grpc
import pytest

from services.cluster.redis_embed import EmbeddedRedis
from services.cluster.registry import (
    SOCKET_TIMEOUT_S,
    InstanceInfo,
    Registration,
    connect,
    list_instances,
)
from services.prefill import main as prefill_main
from tests.cluster import Cluster

pytestmark = pytest.mark.integration
# 2 prefills with one slot each, 15 ms per prefill: 12 concurrent requests must queue.
WORKERS = {"slots": 1}
MODEL = "mock:scaled-gpu"
RECOVERY_BOUND_S = 10.0  # generous: heartbeat 0.2 s and probe 0.25 s give well under 1 s


@pytest.fixture()
def own_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tempfile.mkdtemp(prefix="pdserve-outage-"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _one(c: Cluster, i: int) -> int:
    ids, _, last = await c.generate(prompt_token_ids=[16 + i % 200] * 64, max_tokens=4)
    assert len(ids) == 4, last
    return len(ids)


async def _until(pred, bound_s: float) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not await pred():
        assert time.monotonic() - t0 < bound_s, "not recovered in time"
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


async def test_redis_killed_and_restarted_under_load(own_redis: EmbeddedRedis) -> None:
    async with Cluster(own_redis.url, model=MODEL, prefills=2, decodes=1,
                       worker_overrides=WORKERS, group=f"o{uuid.uuid4().hex[:6]}") as c:
        queue = c.gateway[1].admission.queue
        assert queue is not None
        expected = {i.instance_id for i in await list_instances(connect(own_redis.url))}
        assert len(expected) == 5  # kvstore, 2 prefills, decode, gateway
        await asyncio.gather(*(_one(c, i) for i in range(12)))
        assert c.gateway[1].admission.stats.queued_total > 0  # the Redis queue was used
        offers_before = queue.stats.offers_received
        assert offers_before > 0

        own_redis.kill()
        # Redis is gone: requests keep flowing; the queue waits in the gateway.
        got = await asyncio.gather(*(_one(c, i) for i in range(24)), return_exceptions=True)
        errors = [g for g in got if isinstance(g, BaseException)]
        assert not errors, errors[:3]
        assert queue.degraded and queue.stats.outages == 1
        queued_during = c.gateway[1].admission.stats.queued_total

        own_redis.start()
        t_back = time.monotonic()
        client = connect(own_redis.url)

        async def registry_whole() -> bool:
            try:
                return {i.instance_id for i in await list_instances(client)} == expected
            except OSError:
                return False

        async def queue_whole() -> bool:
            return not queue.degraded

        registry_s = await _until(registry_whole, RECOVERY_BOUND_S)
        await _until(queue_whole, RECOVERY_BOUND_S)
        queue_s = queue.stats.last_resync_at - t_back
        print(f"\nRedis back -> registry whole in {registry_s * 1e3:.0f} ms, forwarding "
              f"queue resynced in {queue_s * 1e3:.0f} ms (outage seen by the gateway "
              f"{queue.stats.last_outage_s:.2f} s)")
        await client.aclose()

        await asyncio.gather(*(_one(c, i) for i in range(12)))
        assert c.gateway[1].admission.stats.queued_total > queued_during
        assert queue.stats.offers_received > offers_before  # offers flow through Redis again
        assert not queue.degraded and queue.waiting() == 0


async def test_without_redis_and_without_a_reachable_prefill_the_answer_is_unavailable(
        own_redis: EmbeddedRedis) -> None:
    async with Cluster(own_redis.url, model=MODEL, prefills=1, decodes=1,
                       worker_overrides=WORKERS, group=f"u{uuid.uuid4().hex[:6]}") as c:
        await _one(c, 0)
        own_redis.kill()
        await _one(c, 1)  # still served from the last view
        for rt, sv in c.prefill_nodes:
            await prefill_main.stop(rt, sv)
        c.prefill_nodes = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await c.generate(prompt_token_ids=[20] * 64, max_tokens=4)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        own_redis.start()


async def test_a_request_queued_while_redis_is_down_is_served_after_it_returns(
        own_redis: EmbeddedRedis) -> None:
    """The resync puts the gateway's local waiters back in the shared queue."""
    async with Cluster(own_redis.url, model=MODEL, prefills=1, decodes=1,
                       worker_overrides={"slots": 1, "emulate_prefill_ms_per_token": 4.0},
                       group=f"w{uuid.uuid4().hex[:6]}") as c:
        queue = c.gateway[1].admission.queue
        assert queue is not None
        own_redis.kill()
        # 64 tokens x 4 ms = 256 ms per prefill, one slot: these wait, some across the restart.
        reqs = [asyncio.create_task(_one(c, i)) for i in range(4)]
        await asyncio.sleep(0.4)
        own_redis.start()
        assert sum(await asyncio.gather(*reqs)) == 16

        async def healthy() -> bool:
            return not queue.degraded

        await _until(healthy, RECOVERY_BOUND_S)



async def test_an_instance_started_while_redis_is_down_registers_when_it_returns() -> None:
    server = EmbeddedRedis(tempfile.mkdtemp(prefix="pdserve-late-"))
    client = connect(server.url)  # nothing listens there yet
    reg = Registration(client, InstanceInfo("p-late", "prefill", "late", "127.0.0.1:1"),
                       ttl_s=3.0, period_s=0.1)
    await reg.start()  # does not raise
    assert reg.failing
    try:
        server.start()
        t0 = time.monotonic()

        async def registered() -> bool:
            try:
                return [i.instance_id for i in await list_instances(client, "late")] == [
                    "p-late"]
            except OSError:
                return False

        await _until(registered, RECOVERY_BOUND_S)
        print(f"\nregistered {1e3 * (time.monotonic() - t0):.0f} ms after Redis came up")
        assert not reg.failing
    finally:
        await reg.close()
        await client.aclose()
        server.stop()


async def test_a_hung_redis_costs_bounded_time_and_no_errors(own_redis: EmbeddedRedis) -> None:
    """SIGSTOP (a hung server, not a dead one): calls time out after the client's socket
    timeout, the queue degrades, requests are served; SIGCONT and it all comes back."""
    async with Cluster(own_redis.url, model=MODEL, prefills=2, decodes=1,
                       worker_overrides=WORKERS, group=f"h{uuid.uuid4().hex[:6]}") as c:
        queue = c.gateway[1].admission.queue
        assert queue is not None
        await asyncio.gather(*(_one(c, i) for i in range(8)))
        assert own_redis.proc is not None
        os.kill(own_redis.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            got = await asyncio.gather(*(_one(c, i) for i in range(16)),
                                       return_exceptions=True)
            hung_s = time.monotonic() - t0
            assert not [g for g in got if isinstance(g, BaseException)], got[:3]
        finally:
            os.kill(own_redis.proc.pid, signal.SIGCONT)
        print(f"\n16 requests with Redis hung: {hung_s:.2f} s in all "
              f"(socket timeout {SOCKET_TIMEOUT_S} s), queue degraded: {queue.degraded}")

        async def healthy() -> bool:
            return not queue.degraded

        await _until(healthy, RECOVERY_BOUND_S)
        await asyncio.gather(*(_one(c, i) for i in range(8)))
