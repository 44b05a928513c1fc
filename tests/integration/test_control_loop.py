"""The live control loop on a real redis-server: two gateway replicas publish their
per-group stats, only the lease holder decides, its plan goes through an actuator that
re-registers the switched instance, and the registry shows the new ratio."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from services.cluster.keys import GROUPS_KEY, instance_key, members_key
from services.cluster.registry import InstanceInfo, connect, list_instances
from services.control.actuator import Capabilities, InstanceStatus, StaleFence, State
from services.control.leader import (
    FENCE_KEY,
    LEASE_KEY,
    PLANS_KEY,
    STATE_KEY,
    LeaderElector,
    current_fence,
)
from services.control.loop import ControlLoop, obs_key, period_of

pytestmark = pytest.mark.integration

GROUP = "ctl-g"
PERIOD_S = 10.0


@pytest.fixture()
async def client(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    c = connect(redis_url)
    await c.delete(LEASE_KEY, FENCE_KEY, PLANS_KEY, STATE_KEY)
    yield c
    await c.delete(LEASE_KEY, FENCE_KEY, PLANS_KEY, STATE_KEY, members_key(GROUP))
    await c.aclose()


class RegistryActuator:
    """A test double of the local-process actuator: it does what the real one does to
    the registry (a drained instance leaves routing; an assigned one re-registers in
    its new role), checks the fence like the real one must, and records its calls."""

    capabilities = Capabilities()

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.calls: list[tuple[str, int]] = []
        self.drained: dict[str, InstanceInfo] = {}

    async def _check(self, fence: int, what: str) -> None:
        if fence != await current_fence(self.client):
            raise StaleFence(f"{what}: stale fence {fence}")
        self.calls.append((what, fence))

    async def _info(self, instance_id: str) -> InstanceInfo | None:
        for i in await list_instances(self.client, GROUP):
            if i.instance_id == instance_id:
                return i
        return self.drained.get(instance_id)

    async def status(self, instance_id: str) -> InstanceStatus:
        if instance_id in self.drained:
            i = self.drained[instance_id]
            return InstanceStatus(instance_id, State.DRAINED, i.role, i.group)
        i = await self._info(instance_id)
        if i is None:
            return InstanceStatus(instance_id, State.GONE)
        return InstanceStatus(instance_id, State.SERVING, i.role, i.group)

    async def replicas(self, group: str, role: str) -> int:
        return sum(1 for i in await list_instances(self.client, group) if i.role == role)

    async def drain(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        await self._check(fence, f"drain {instance_id}")
        info = await self._info(instance_id)
        assert info is not None
        await self.client.srem(members_key(info.group), instance_id)
        await self.client.delete(instance_key(info.group, instance_id))
        self.drained[instance_id] = info

    async def assign(self, instance_id: str, role: str, group: str, *, fence: int,
                     timeout_s: float) -> None:
        await self._check(fence, f"assign {instance_id} {role}@{group}")
        info = self.drained.pop(instance_id)
        await register(self.client, InstanceInfo(instance_id, role, group, info.address,
                                                 slots=info.slots))

    async def release(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        raise AssertionError("fixed total: nothing is released")

    async def scale(self, group: str, role: str, replicas: int, *, fence: int,
                    timeout_s: float) -> None:
        raise AssertionError("not a scale actuator")


async def register(client: aioredis.Redis, info: InstanceInfo) -> None:
    await client.sadd(GROUPS_KEY, info.group)
    await client.sadd(members_key(info.group), info.instance_id)
    await client.set(instance_key(info.group, info.instance_id), info.to_json(), px=60_000)


async def test_only_the_leader_acts_and_the_switch_reaches_the_registry(
        client: aioredis.Redis) -> None:
    for k in range(4):
        await register(client, InstanceInfo(f"p{k}", "prefill", GROUP, f"h:{k}", slots=1))
        await register(client, InstanceInfo(f"d{k}", "decode", GROUP, f"h:{10 + k}", slots=16,
                                            load={"active": 8.0}))
    act = RegistryActuator(client)
    now = {"t": 1_000_000.0 * PERIOD_S + 1.0}

    def clock() -> float:
        return now["t"]

    loops = [ControlLoop(client, LeaderElector(client, f"gw-{n}", ttl_s=5.0), act,
                         period_s=PERIOD_S, clock=clock) for n in "ab"]
    for lp in loops:
        await lp.elector.campaign_once()
    leader = next(lp for lp in loops if lp.elector.is_leader())
    other = next(lp for lp in loops if lp is not leader)

    async def period(e2e: float, ttft: float) -> list[list[str]]:
        p = period_of(now["t"], PERIOD_S)
        await client.delete(obs_key(p))
        for k in range(300):  # both gateways serve half of the requests (30/s)
            loops[k % 2].window.record(GROUP, True, e2e, ttft, 800, 200, 60.0, 2.0, 15.0)
        for lp in loops:
            await lp.flush(p)
        now["t"] += PERIOD_S
        return [await other.tick(), await leader.tick()]

    assert await period(3000.0, 900.0) == [[], []]  # warm-up: the reference is taken
    assert await period(3100.0, 950.0) == [[], []]
    # E2E up with the TTFT share down, and 30 req/s over Eq. 1's capacity of 4:4: decode
    follower, decided = await period(6000.0, 600.0)
    assert follower == []
    # The live profile (60 ms prefills, 200-token answers at 15 ms TPOT, b_d 16) puts
    # Eq. 1's best split of 8 at P2/D6: two switches, the step cap (25% of 8).
    assert len(decided) == 2 and all("decode@ctl-g from prefill" in d for d in decided)
    roles = sorted(i.role for i in await list_instances(client, GROUP))
    assert roles.count("decode") == 6 and roles.count("prefill") == 2
    fence = leader.elector.fence
    assert [f for _, f in act.calls] == [fence] * 4
    for p in ("p0", "p1"):  # each drained before it was assigned
        calls = [c for c, _ in act.calls if c.split()[1] == p]
        assert calls == [f"drain {p}", f"assign {p} decode@ctl-g"]
    assert await leader.store.pending() == []
    # The state is in Redis: the follower, once it leads, starts from it.
    state = await leader.store.load_state()
    assert state[GROUP]["cooldown"] == 1
    for lp in loops:
        await lp.elector.close()
