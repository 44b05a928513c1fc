"""Redis Cluster: every pdserve step works against a real 3-master cluster that this
module starts from the redis-server binary (one hash tag per group; multi-key steps are
Lua over one group's slot, or single-key). Groups are chosen so their slots live on
different masters, and the gateways' offer subscriptions sit on whatever node the
cluster client picks, so offers cross nodes over the cluster bus."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis

from services.cluster import slotoffer
from services.cluster.keys import instance_key
from services.cluster.redis_embed import EmbeddedRedisCluster
from services.cluster.registry import (
    InstanceInfo,
    Registration,
    RegistryView,
    connect,
    list_instances,
)
from services.gateway.fwdqueue import ForwardingQueue
from tests.cluster import Cluster

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[EmbeddedRedisCluster]:
    server = EmbeddedRedisCluster(masters=3)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
async def client(redis_cluster: EmbeddedRedisCluster) -> AsyncIterator[object]:
    c = connect(redis_cluster.url)
    try:
        yield c
    finally:
        await c.aclose()


def _groups_on_every_master(rc: EmbeddedRedisCluster) -> list[str]:
    """One group name per master: the owner of each group's hash slot differs."""
    sync = redis.RedisCluster(host="127.0.0.1", port=rc.ports[0])
    try:
        by_node: dict[str, str] = {}
        while len(by_node) < rc.masters:
            g = f"c{uuid.uuid4().hex[:6]}"
            node = sync.get_node_from_key(instance_key(g, "x")).name
            by_node.setdefault(node, g)
        return list(by_node.values())
    finally:
        sync.close()


def test_connect_parses_cluster_urls() -> None:
    from redis.asyncio.cluster import RedisCluster

    c = connect("redis+cluster://u:pw@10.0.0.1:7000,10.0.0.2:7001")
    assert isinstance(c, RedisCluster)
    assert [(n.host, n.port) for n in c.startup_nodes] == [("10.0.0.1", 7000),
                                                                  ("10.0.0.2", 7001)]
    with pytest.raises(ValueError):
        connect("redis+cluster://")


async def test_registry_across_masters(redis_cluster: EmbeddedRedisCluster,
                                       client: object) -> None:
    groups = _groups_on_every_master(redis_cluster)
    regs = [Registration(client, InstanceInfo(f"{role}-{g}", role, g, f"127.0.0.1:{i}"),
                         ttl_s=3.0, period_s=0.2)
            for i, g in enumerate(groups) for role in ("prefill", "decode")]
    for r in regs:
        await r.start()
    try:
        found = await list_instances(client)
        assert {i.instance_id for i in found} >= {r.info.instance_id for r in regs}
        assert {i.instance_id for i in await list_instances(client, groups[1])} == {
            f"prefill-{groups[1]}", f"decode-{groups[1]}"}
        view = RegistryView(client)
        assert await view.refresh()
        assert len(view.instances(role="prefill")) >= 3
    finally:
        for r in regs:
            await r.close()
    left = {i.instance_id for i in await list_instances(client)}
    assert not left & {r.info.instance_id for r in regs}  # deregistration is atomic per group


async def test_forwarding_queue_offers_across_masters(redis_cluster: EmbeddedRedisCluster,
                                                      client: object) -> None:
    a = ForwardingQueue(client, f"gwA-{uuid.uuid4().hex[:6]}", 5.0)
    b = ForwardingQueue(client, f"gwB-{uuid.uuid4().hex[:6]}", 5.0)
    await a.start()
    await b.start()
    try:
        for g in _groups_on_every_master(redis_cluster):
            now = time.time() * 1000
            assert not await a.enter(g, "late", now + 20_000)  # no prefill claimed
            assert not await b.enter(g, "early", now + 10_000)  # no prefill claimed
            assert await a.rank(g, "late") == 1
            early = asyncio.create_task(b.wait(g, "early"))
            late = asyncio.create_task(a.wait(g, "late"))
            await asyncio.sleep(0.02)
            assert await slotoffer.offer_slot(client, g, "p0") == slotoffer.member(
                "early", b._gateway_id)
            assert await asyncio.wait_for(early, 3) == "p0"
            assert not late.done()
            await b.leave(g, "early")
            await slotoffer.offer_slot(client, g, "p1")
            assert await asyncio.wait_for(late, 3) == "p1"
            await a.leave(g, "late")
            await b.settled()  # removals go to Redis in the background
            assert await a.depth(g) == 0
            assert await slotoffer.offer_slot(client, g, "p2") is None  # remembered as free
            assert await a.enter(g, "next", time.time() * 1000 + 5_000) == "p2"
            await a.leave(g, "next")
            await slotoffer.resync(client, g, a._gateway_id, int(now + 5_000), {})
        assert a.stats.safety_polls == 0 and b.stats.safety_polls == 0
    finally:
        await a.close()
        await b.close()


async def test_a_whole_pdserve_cluster_serves_through_redis_cluster(
        redis_cluster: EmbeddedRedisCluster) -> None:
    """Every service (kvstore, prefill, decode, gateway) with a redis+cluster:// URL, one
    prefill slot so requests go through the forwarding queue."""
    async with Cluster(redis_cluster.url, model="mock:scaled-gpu", prefills=1, decodes=1,
                       worker_overrides={"slots": 1}) as c:
        results = await asyncio.gather(*(c.generate(prompt_token_ids=[17 + i] * 32,
                                                    max_tokens=3) for i in range(6)))
        assert all(len(ids) == 3 for ids, _, _ in results)
        queue = c.gateway[1].admission.queue
        assert queue is not None and not queue.degraded
        assert c.gateway[1].admission.stats.queued_total > 0
        assert queue.stats.offers_received > 0
