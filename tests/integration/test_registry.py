"""The Redis registry against a real redis-server."""

from __future__ import annotations

import asyncio

import pytest

from services.cluster.registry import (
    InstanceInfo,
    Registration,
    RegistryView,
    connect,
    list_instances,
    members_key,
)

pytestmark = pytest.mark.integration


async def test_dead_instance_drops_out_after_its_lease(redis_url: str) -> None:
    client = connect(redis_url)
    info = InstanceInfo("p-dead", "prefill", "reg-a", "127.0.0.1:1", slots=2)
    live = InstanceInfo("p-live", "prefill", "reg-a", "127.0.0.1:2", slots=2)
    dying = Registration(client, info, ttl_s=0.6, period_s=0.2)
    alive = Registration(client, live, ttl_s=0.6, period_s=0.2, load_fn=lambda: {"busy": 1.0})
    await dying.start()
    await alive.start()
    view = RegistryView(client, period_s=0.1)
    await view.start()
    assert {i.instance_id for i in view.instances(group="reg-a")} == {"p-dead", "p-live"}
    assert dying._task is not None
    dying._task.cancel()  # the process "dies": no deregistration, no more beats
    await asyncio.sleep(1.2)
    assert [i.instance_id for i in view.instances(group="reg-a")] == ["p-live"]
    assert view.instances(group="reg-a")[0].load == {"busy": 1.0}
    assert await client.smembers(members_key("reg-a")) == {b"p-live"}  # pruned
    await alive.close()  # graceful leave is immediate
    assert await list_instances(client, "reg-a") == []
    await view.close()
    await client.aclose()


async def test_groups_are_listed_separately(redis_url: str) -> None:
    client = connect(redis_url)
    regs = [Registration(client, InstanceInfo(f"i{g}", "decode", g, "h:1"), 2.0, 0.5)
            for g in ("reg-x", "reg-y")]
    for r in regs:
        await r.start()
    assert [i.group for i in await list_instances(client, "reg-x")] == ["reg-x"]
    groups = {i.group for i in await list_instances(client)}
    assert {"reg-x", "reg-y"} <= groups
    for r in regs:
        await r.close()
    await client.aclose()
