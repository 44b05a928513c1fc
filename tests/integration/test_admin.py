"""The admin service's group operations on in-process workers, a real gateway, kvstore
and Redis: scale out a whole group from spares, rolling upgrade with the ratio kept and
requests flowing, substitution of an instance that fails its health checks, scale in."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from pdserve.v1 import admin_service_pb2 as apb
from pdserve.v1 import admin_service_pb2_grpc as apb_grpc
from services.admin import main as admin_main
from services.cluster.registry import connect, list_instances
from services.common.errors import error_info
from services.common.runtime import ServiceRuntime, new_channel
from services.worker import main as worker_main
from services.worker.host import HostConfig, RoleHost
from tests.cluster import Cluster

pytestmark = pytest.mark.integration


@dataclass
class Fleet:
    cluster: Cluster
    workers: list[tuple[ServiceRuntime, RoleHost]]
    admin: apb_grpc.AdminServiceStub


@pytest.fixture()
async def fleet(redis_url: str) -> AsyncIterator[Fleet]:
    async with Cluster(redis_url, prefills=0, decodes=0) as c:
        base = dict(redis_url=redis_url, heartbeat_s=0.2, registry_ttl_s=1.0, grace_s=0.5)
        # Spares wait in their own home group, so the served group only has its members.
        workers = [await worker_main.start(HostConfig(
            **base, group=f"spares-{c.group}", model="tiny", instance_id=f"w{i}-{c.group}",
            kv_pool_tokens=4096)) for i in range(4)]
        (admin,) = await admin_main.start(admin_main.AdminConfig(
            **base, group=c.group, instance_id=f"admin-{c.group}", fail_after=1))
        ch = new_channel(admin.runtime.address)
        try:
            yield Fleet(c, workers, apb_grpc.AdminServiceStub(ch))
        finally:
            await ch.close()
            await admin_main.stop(admin)
            for rt, host in workers:
                with contextlib.suppress(Exception):
                    await worker_main.stop(rt, host)


async def _events(call: object) -> list[apb.OpEvent]:
    return [e async for e in call]  # type: ignore[attr-defined]


async def _refresh(c: Cluster) -> None:
    for _, _, view in c.gateway_nodes:
        await view.refresh()


async def _mine(f: Fleet) -> list[str]:
    """This fleet's spares (the registry is shared by the test session)."""
    r = await f.admin.ListGroups(apb.ListGroupsRequest())
    return [m.instance_id for m in r.spares if m.instance_id.endswith(f.cluster.group)]


async def test_group_lifecycle(fleet: Fleet, redis_url: str) -> None:
    c = fleet.cluster
    g = c.group
    ev = await _events(fleet.admin.ScaleOut(apb.ScaleOutRequest(group=g, prefill=1, decode=1)))
    assert ev[-1].done and ev[-1].ok
    r = await fleet.admin.ListGroups(apb.ListGroupsRequest())
    mine = next(x for x in r.groups if x.name == g)
    assert (mine.prefill, mine.decode) == (1, 1)
    assert len(await _mine(fleet)) == 2
    await _refresh(c)
    assert len((await c.generate(prompt="scaled out", max_tokens=6))[0]) >= 1

    # Rolling upgrade (worker setting slots=8) with requests flowing: none fails.
    stop = asyncio.Event()

    async def load() -> int:
        n = 0
        while not stop.is_set():
            await c.generate(prompt=f"during the upgrade {n}", max_tokens=6)
            n += 1
        return n

    traffic = asyncio.create_task(load())
    ev = await _events(fleet.admin.RollingUpgrade(apb.RollingUpgradeRequest(
        groups=[g], settings={"slots": "8", "prefill_slots": "2"})))
    stop.set()
    assert await traffic >= 1  # every request of the loop succeeded (no exception)
    assert ev[-1].done and any("ratio 1p1d" in e.message for e in ev)
    client = connect(redis_url)
    try:
        members = [i for i in await list_instances(client, g) if i.role in ("prefill", "decode")]
    finally:
        await client.aclose()
    assert sorted((i.role, i.slots) for i in members) == [("decode", 8), ("prefill", 2)]

    # Substitution: the decode stops answering (its server is gone, its lease still beats).
    dec = next(i for i in members if i.role == "decode")
    rt, _ = next(w for w in fleet.workers if w[0].instance_id == dec.instance_id)
    await rt.server.stop(0)
    ev = await _events(fleet.admin.Substitute(apb.SubstituteRequest(
        instance_id=dec.instance_id)))
    assert [e.step for e in ev] == ["remove", "assign", "done"]
    client = connect(redis_url)
    try:
        now = {i.instance_id: i.role for i in await list_instances(client, g)}
    finally:
        await client.aclose()
    assert dec.instance_id not in now and list(now.values()).count("decode") == 1
    await _refresh(c)
    assert len((await c.generate(prompt="after substitution", max_tokens=6))[0]) >= 1

    # A healthy instance is not substituted.
    pre = next(i for i in members if i.role == "prefill")
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _events(fleet.admin.Substitute(apb.SubstituteRequest(instance_id=pre.instance_id)))
    info = error_info(ei.value)
    assert info is not None and info.reason == "INSTANCE_HEALTHY"

    # Scale in: out of routing, drained, released; the spare pool gets them back.
    ev = await _events(fleet.admin.ScaleIn(apb.ScaleInRequest(group=g)))
    assert [e.step for e in ev][-1] == "done"
    r = await fleet.admin.ListGroups(apb.ListGroupsRequest())
    assert g not in [x.name for x in r.groups if x.prefill or x.decode]
    assert len(await _mine(fleet)) == 3  # 4 workers, one of them dead
    assert (await c.kv_stats()).bytes_held == 0


async def test_scale_out_needs_enough_spares(fleet: Fleet) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await _events(fleet.admin.ScaleOut(apb.ScaleOutRequest(
            group=f"big-{fleet.cluster.group}", prefill=40, decode=40)))
    assert ei.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(ei.value)
    assert info is not None and info.reason == "NOT_ENOUGH_SPARES"


async def test_auto_substitution_replaces_a_lapsed_member(redis_url: str) -> None:
    """The watch (auto_substitute) sees a member's record gone (lease lapsed) and gives
    its role to a spare, with no operator call."""
    async with Cluster(redis_url, prefills=0, decodes=0) as c:
        base = dict(redis_url=redis_url, heartbeat_s=0.2, registry_ttl_s=1.0, grace_s=0.5)
        roles = ("prefill", "decode", "idle")
        workers = [await worker_main.start(HostConfig(
            **base, group=c.group if role != "idle" else f"spares-{c.group}", model="tiny",
            role=role, instance_id=f"a{i}-{c.group}", kv_pool_tokens=4096))
            for i, role in enumerate(roles)]
        (admin,) = await admin_main.start(admin_main.AdminConfig(
            **base, group=c.group, instance_id=f"admin-{c.group}", auto_substitute=True,
            watch_s=0.3))
        try:
            rt, _ = workers[1]  # the decode: its heartbeat stops, its lease lapses
            assert rt.registration is not None
            await rt.registration.close()
            await rt.server.stop(0)
            client = connect(redis_url)
            try:
                for _ in range(300):  # 30 s: a loaded CI box is slow
                    now = {i.instance_id: i.role for i in await list_instances(client, c.group)}
                    if now.get(f"a2-{c.group}") == "decode":
                        break
                    await asyncio.sleep(0.1)
            finally:
                await client.aclose()
            assert now.get(f"a2-{c.group}") == "decode" and f"a1-{c.group}" not in now
            await _refresh(c)
            assert len((await c.generate(prompt="after auto substitution", max_tokens=6))[0])
        finally:
            await admin_main.stop(admin)
            for w in workers:
                with contextlib.suppress(Exception):
                    await worker_main.stop(*w)
