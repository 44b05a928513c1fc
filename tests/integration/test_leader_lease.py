"""The controller's Redis lease against a real redis-server: one leader at a time,
growing fencing tokens, a dead leader's plan finished by its successor, stale writes
and stale actuator calls refused."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.cluster.registry import connect
from services.control.actuator import (
    Capabilities,
    Decision,
    InstanceStatus,
    Kind,
    StaleFence,
    State,
    plan_for,
)
from services.control.executor import run_plan
from services.control.leader import (
    FENCE_KEY,
    LEASE_KEY,
    PLANS_KEY,
    STATE_KEY,
    LeaderElector,
    PlanStore,
    current_fence,
)

pytestmark = pytest.mark.integration


@pytest.fixture()
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = connect(redis_url)
    await c.delete(LEASE_KEY, FENCE_KEY, PLANS_KEY, STATE_KEY)
    yield c
    await c.delete(LEASE_KEY, FENCE_KEY, PLANS_KEY, STATE_KEY)
    await c.aclose()


class FencedInstances:
    """A test double of the ``Actuator`` protocol: instances as a dict, every call
    checked against the highest fence seen (what a real actuator must do), and a
    switch to 'die' after a given number of calls (the controller crashing mid-plan)."""

    capabilities = Capabilities()

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.inst: dict[str, InstanceStatus] = {}
        self.calls: list[str] = []
        self.highest = 0
        self.die_after = -1

    async def _fence(self, fence: int, what: str) -> None:
        # The real check: older than one seen, or not the lease now held -> refuse.
        if fence < self.highest or fence != await current_fence(self.client):
            raise StaleFence(f"{what}: fence {fence} is stale")
        self.highest = fence
        if self.die_after == 0:
            raise asyncio.CancelledError  # the controller process dies here
        self.die_after -= 1
        self.calls.append(what)

    async def status(self, instance_id: str) -> InstanceStatus:
        return self.inst.get(instance_id, InstanceStatus(instance_id, State.GONE))

    async def replicas(self, group: str, role: str) -> int:
        return sum(1 for s in self.inst.values() if (s.group, s.role) == (group, role))

    async def drain(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        await self._fence(fence, f"drain {instance_id}")
        s = self.inst[instance_id]
        self.inst[instance_id] = InstanceStatus(instance_id, State.DRAINED, s.role, s.group)

    async def assign(self, instance_id: str, role: str, group: str, *, fence: int,
                     timeout_s: float) -> None:
        await self._fence(fence, f"assign {instance_id} {role}@{group}")
        self.inst[instance_id] = InstanceStatus(instance_id, State.SERVING, role, group)

    async def release(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        await self._fence(fence, f"release {instance_id}")
        self.inst[instance_id] = InstanceStatus(instance_id, State.IDLE)

    async def scale(self, group: str, role: str, replicas: int, *, fence: int,
                    timeout_s: float) -> None:
        raise AssertionError("not a scale actuator")


async def test_one_leader_among_many_contenders(client: aioredis.Redis) -> None:
    electors = [LeaderElector(client, f"gw{i}", ttl_s=2.0) for i in range(8)]
    results = await asyncio.gather(*(e.campaign_once() for e in electors))
    assert sum(results) == 1
    leader = electors[results.index(True)]
    assert leader.fence == await current_fence(client) > 0
    # Renewing keeps the same token; the others keep failing.
    assert await leader.campaign_once() and leader.fence == await current_fence(client)
    assert not any([await e.campaign_once() for e in electors if e is not leader])
    await leader.close()  # graceful: the lease is free at once
    assert await current_fence(client) == 0
    nxt = [await e.campaign_once() for e in electors if e is not leader]
    assert sum(nxt) == 1
    for e in electors:
        await e.close()


async def test_dead_leader_is_replaced_with_a_larger_fence_and_cannot_write(
        client: aioredis.Redis) -> None:
    a = LeaderElector(client, "gw-a", ttl_s=0.6)
    b = LeaderElector(client, "gw-b", ttl_s=0.6)
    await a.start()
    await b.start()
    assert a.is_leader() and not b.is_leader()
    fence_a, value_a = a.fence, a.lease_value
    assert a._task is not None
    a._task.cancel()  # a "pauses": no renewals, no release
    await _until(b.is_leader)
    assert not a.is_leader()  # a's own belief lapsed before its lease did
    assert b.fence > fence_a
    store = PlanStore(client)
    plan = plan_for(Decision(Kind.SWITCH, "g", "decode", "i1", "g", "prefill"), fence_a, "x",
                    Capabilities())
    with pytest.raises(StaleFence):
        await store.save(plan, value_a)  # the paused leader woke up: refused
    await store.save(plan, b.lease_value)
    assert [p.plan_id for p in await store.pending()] == ["x"]
    await store.save_state({"g": {"ref_e2e": 1.0}}, b.lease_value)
    assert await store.load_state() == {"g": {"ref_e2e": 1.0}}
    with pytest.raises(StaleFence):
        await store.save_state({}, value_a)
    await b.close()
    await a.close()


async def test_successor_finishes_a_plan_the_dead_leader_left_half_done(
        client: aioredis.Redis) -> None:
    act = FencedInstances(client)
    act.inst["i1"] = InstanceStatus("i1", State.SERVING, "prefill", "g")
    store = PlanStore(client)
    a = LeaderElector(client, "gw-a", ttl_s=0.6)
    assert await a.campaign_once()
    plan = plan_for(Decision(Kind.SWITCH, "g", "decode", "i1", "g", "prefill"), a.fence,
                    "p1", Capabilities())
    act.die_after = 1  # the drain goes through, then the leader dies before the assign
    with pytest.raises(asyncio.CancelledError):
        await run_plan(plan, act, store, a.fence, a.lease_value)
    assert act.inst["i1"].state is State.DRAINED
    [left] = await store.pending()
    assert left.done == 1  # the drain was recorded
    b = LeaderElector(client, "gw-b", ttl_s=0.6)
    await _until_async(b.campaign_once)
    act.die_after = -1
    # The old leader's token is refused by the actuator as well as by the store.
    with pytest.raises(StaleFence):
        await act.assign("i1", "decode", "g", fence=a.fence, timeout_s=1)
    for p in await store.pending():
        await run_plan(p, act, store, b.fence, b.lease_value)
    assert act.inst["i1"] == InstanceStatus("i1", State.SERVING, "decode", "g")
    assert act.calls == ["drain i1", "assign i1 decode@g"]  # nothing done twice
    assert await store.pending() == []
    await b.close()


async def test_a_plan_whose_instance_died_is_undone(client: aioredis.Redis) -> None:
    act = FencedInstances(client)
    act.inst["i1"] = InstanceStatus("i1", State.SERVING, "prefill", "g")
    act.inst["i2"] = InstanceStatus("i2", State.SERVING, "decode", "h")
    store = PlanStore(client)
    a = LeaderElector(client, "gw-a", ttl_s=2.0)
    assert await a.campaign_once()
    move = plan_for(Decision(Kind.MOVE, "g", "decode", "i2", "h", "decode"), a.fence, "m",
                    Capabilities())
    act.die_after = 1
    with pytest.raises(asyncio.CancelledError):
        await run_plan(move, act, store, a.fence, a.lease_value)
    act.die_after = -1
    # i2 is drained; then it dies, so the assign is impossible and the plan is undone.
    del act.inst["i2"]
    [left] = await store.pending()
    end = await run_plan(left, act, store, a.fence, a.lease_value)
    assert end.aborted and await store.pending() == []
    # An instance that is only drained (alive) is restored by the undo instead.
    act.inst["i3"] = InstanceStatus("i3", State.SERVING, "decode", "h")
    sw = plan_for(Decision(Kind.MOVE, "g", "decode", "i3", "h", "decode"), a.fence, "m2",
                  Capabilities())
    undo = sw.advance().abort()
    act.inst["i3"] = InstanceStatus("i3", State.DRAINED, "decode", "h")
    await run_plan(undo, act, store, a.fence, a.lease_value)
    assert act.inst["i3"] == InstanceStatus("i3", State.SERVING, "decode", "h")
    await a.close()


async def _until(pred) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        if pred():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not reached")


async def _until_async(fn) -> None:  # type: ignore[no-untyped-def]
    for _ in range(200):
        if await fn():
            return
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not reached")
