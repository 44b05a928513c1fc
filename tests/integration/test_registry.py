"""The Redis registry against a real redis-server."""

from __future__ import annotations

import asyncio
from typing import Any

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


async def test_a_lister_never_prunes_a_registration_that_came_back(
        redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A role switch is LEAVE then BEAT. A lister that read the member set before the
    LEAVE and the record after it sees a dead id; if the instance registers again before
    the prune, it must stay listed (it used to vanish until its next heartbeat)."""
    from services.cluster import registry

    client = connect(redis_url)
    info = InstanceInfo("w-switch", "decode", "reg-race", "127.0.0.1:3", slots=2)
    back = Registration(client, info, ttl_s=30, period_s=30)
    # What the lister saw: the id in the member set, its record already gone (LEAVE).
    await client.sadd(members_key("reg-race"), "w-switch")
    real = client.register_script

    def hooked(body: str) -> Any:
        script = real(body)
        if body != registry._PRUNE:
            return script

        async def prune_after_the_beat(**kw: Any) -> Any:
            await back.start()  # the BEAT lands between the lister's GET and its prune
            return await script(**kw)
        return prune_after_the_beat

    monkeypatch.setattr(client, "register_script", hooked)
    assert await list_instances(client, "reg-race") == []  # this listing saw it dead
    monkeypatch.undo()
    listed = await list_instances(client, "reg-race")
    assert [(i.instance_id, i.role) for i in listed] == [("w-switch", "decode")]
    await back.close()
    await client.aclose()
