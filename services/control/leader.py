"""Exactly one controller acts at a time across gateway replicas: a Redis lease with a
fencing token, and fenced storage for the plans and controller state a successor needs.

Keys (one hash tag, so the Lua scripts touch one cluster slot):
  pdserve:{control}:lease   "<holder>|<fence>" with a TTL: who leads, under which token
  pdserve:{control}:fence   INCR counter: every new lease gets a larger token
  pdserve:{control}:plans   HASH plan id -> Plan JSON (the plans under way)
  pdserve:{control}:state   the controller's per-group state (JSON)

Safety argument:
- Acquire is one Lua script: SET only if absent, token from INCR, so two contenders can
  never both get a lease, and tokens grow strictly.
- The holder renews at ``ttl / 3``. It believes it leads only until ``t0 + ttl * (1 -
  drift)``, where ``t0`` is taken *before* the renew request was sent, so its belief
  ends before Redis expires the lease even if the reply was slow.
- A process that paused (GC, SIGSTOP) past its lease may still act once it wakes; every
  write it makes here is fenced (a Lua compare of the lease value), and every actuator
  call carries the token, which actuators check against ``current_fence`` (or remember
  the highest seen) and refuse when older. That is the fencing-token rule: belief alone
  is never trusted for a side effect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.common.tasks import cancel_and_wait
from services.control.actuator import Plan, StaleFence

log = logging.getLogger(__name__)

LEASE_KEY = "pdserve:{control}:lease"
FENCE_KEY = "pdserve:{control}:fence"
PLANS_KEY = "pdserve:{control}:plans"
STATE_KEY = "pdserve:{control}:state"

_ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, '|[^|]*$')
  local holder = string.sub(cur, 1, sep - 1)
  if holder == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return {tonumber(string.sub(cur, sep + 1)), 1, tonumber(ARGV[2])}
  end
  return {0, 0, redis.call('PTTL', KEYS[1])}
end
local f = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. f, 'PX', ARGV[2])
return {f, 1, tonumber(ARGV[2])}
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: lease, target hash; ARGV: lease value, op ("set" | "del"), field, value
_FENCED_HASH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == 'set' then redis.call('HSET', KEYS[2], ARGV[3], ARGV[4])
else redis.call('HDEL', KEYS[2], ARGV[3]) end
return 1
"""

# KEYS: lease, target; ARGV: lease value, value
_FENCED_SET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Lease:
    holder: str
    fence: int  # 0: not held by this holder
    ttl_ms: int  # the lease's TTL if held, else what is left of the other holder's

    @property
    def held(self) -> bool:
        return self.fence > 0

    @property
    def value(self) -> str:
        return f"{self.holder}|{self.fence}"


async def current_fence(client: aioredis.Redis) -> int:
    """The token of the lease now held (0 if none): what an actuator compares against."""
    raw = await client.get(LEASE_KEY)
    if raw is None:
        return 0
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return int(text.rsplit("|", 1)[1])


class LeaderElector:
    """Campaigns for the lease and keeps it; ``is_leader()`` is the conservative local
    belief (see the module doc), ``fence`` the token to pass to every action."""

    def __init__(self, client: aioredis.Redis, holder: str, ttl_s: float = 6.0,
                 drift: float = 0.1) -> None:
        if "|" in holder or not holder:
            raise ValueError("a lease holder id must be non-empty and contain no '|'")
        self._client = client
        self.holder = holder
        self._ttl_ms = max(300, int(ttl_s * 1000))
        self._drift = drift
        self._valid_until = 0.0
        self._fence = 0
        self._task: asyncio.Task[None] | None = None
        self._acquire = client.register_script(_ACQUIRE)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self.changed = asyncio.Event()  # set on every gain or loss of leadership

    @property
    def fence(self) -> int:
        return self._fence if self.is_leader() else 0

    @property
    def lease_value(self) -> str:
        return f"{self.holder}|{self._fence}"

    def is_leader(self) -> bool:
        return self._fence > 0 and time.monotonic() < self._valid_until

    async def campaign_once(self) -> bool:
        """One acquire-or-renew round; returns whether this holder leads afterwards."""
        t0 = time.monotonic()
        was = self.is_leader()
        try:
            if self._fence > 0:
                ok = await self._renew(keys=[LEASE_KEY], args=[self.lease_value, self._ttl_ms])
                if not ok:
                    self._fence = 0
            if self._fence == 0:
                fence, held, _ = await self._acquire(keys=[LEASE_KEY, FENCE_KEY],
                                                     args=[self.holder, self._ttl_ms])
                self._fence = int(fence) if held else 0
            if self._fence > 0:
                self._valid_until = t0 + self._ttl_ms / 1000.0 * (1.0 - self._drift)
        except (aioredis.RedisError, OSError) as e:
            log.warning("leader lease round failed: %s", e)  # belief lapses on its own
        now = self.is_leader()
        if now != was:
            log.info("controller lease %s by %s (fence %d)", "gained" if now else "lost",
                     self.holder, self._fence)
            self.changed.set()
        return now

    async def start(self) -> None:
        await self.campaign_once()
        self._task = asyncio.create_task(self._loop(), name=f"lease-{self.holder}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._ttl_ms / 3000.0)
            await self.campaign_once()

    async def close(self) -> None:
        """Stop campaigning and hand the lease back at once (a graceful step-down)."""
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._fence > 0:
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self._release(keys=[LEASE_KEY], args=[self.lease_value])
        self._fence = 0


class PlanStore:
    """Plans under way and the controller state, written only under the current lease."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._hash = client.register_script(_FENCED_HASH)
        self._set = client.register_script(_FENCED_SET)

    async def _check(self, ok: object, what: str, lease_value: str) -> None:
        if not ok:
            raise StaleFence(f"{what}: the lease is no longer {lease_value!r}")

    async def save(self, plan: Plan, lease_value: str) -> None:
        ok = await self._hash(keys=[LEASE_KEY, PLANS_KEY],
                              args=[lease_value, "set", plan.plan_id, plan.to_json()])
        await self._check(ok, f"save plan {plan.plan_id}", lease_value)

    async def finish(self, plan: Plan, lease_value: str) -> None:
        ok = await self._hash(keys=[LEASE_KEY, PLANS_KEY],
                              args=[lease_value, "del", plan.plan_id, ""])
        await self._check(ok, f"finish plan {plan.plan_id}", lease_value)

    async def pending(self) -> list[Plan]:
        raw = await self._client.hgetall(PLANS_KEY)
        return sorted((Plan.from_json(v) for v in raw.values()), key=lambda p: p.plan_id)

    async def save_state(self, state: dict[str, dict[str, object]], lease_value: str) -> None:
        ok = await self._set(keys=[LEASE_KEY, STATE_KEY],
                             args=[lease_value, json.dumps(state, separators=(",", ":"))])
        await self._check(ok, "save controller state", lease_value)

    async def load_state(self) -> dict[str, dict[str, object]]:
        raw = await self._client.get(STATE_KEY)
        return json.loads(raw) if raw else {}
