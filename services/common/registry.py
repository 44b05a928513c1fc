"""Instance registry in Redis: who serves which role in which scenario group.

Layout (one hash tag per group, so a group's keys share a cluster slot):
  pdserve:groups                  SET of group names
  pdserve:{<group>}:members       SET of instance ids
  pdserve:{<group>}:inst:<id>     JSON InstanceInfo, with a TTL (the lease)

Every heartbeat rewrites the record with a fresh TTL, so a lost write or a Redis
failover heals at the next beat, and an instance that dies drops out when its
lease expires. Readers prune member ids whose record has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis

from services.common.keys import GROUPS_KEY, instance_key, members_key
from services.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceInfo:
    """What an instance advertises. ``load`` is refreshed at every heartbeat."""

    instance_id: str
    role: str  # "prefill", "decode", "kvstore", "gateway"
    group: str
    address: str  # gRPC host:port
    data_address: str = ""  # KV data channel, for roles that have one
    transports: tuple[str, ...] = ()
    slots: int = 0
    model_fingerprint: str = ""
    host_id: str = ""  # machine identity, for same-host transports
    started_unix: float = 0.0
    load: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(raw: str | bytes) -> InstanceInfo:
        d: dict[str, Any] = json.loads(raw)
        d["transports"] = tuple(d.get("transports", ()))
        return InstanceInfo(**d)


def connect(url: str) -> aioredis.Redis:
    return aioredis.Redis.from_url(url, decode_responses=False)


class Registration:
    """Keeps one instance's record alive until ``close``."""

    def __init__(
        self,
        client: aioredis.Redis,
        info: InstanceInfo,
        ttl_s: float,
        period_s: float,
        load_fn: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self._client = client
        self._info = info
        self._ttl_ms = int(ttl_s * 1000)
        self._period_s = period_s
        self._load_fn = load_fn
        self._task: asyncio.Task[None] | None = None

    @property
    def info(self) -> InstanceInfo:
        return self._info

    async def beat(self) -> None:
        info = self._info
        if self._load_fn is not None:
            info = replace(info, load=self._load_fn())
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.sadd(GROUPS_KEY, info.group)
            pipe.sadd(members_key(info.group), info.instance_id)
            pipe.set(instance_key(info.group, info.instance_id), info.to_json(), px=self._ttl_ms)
            await pipe.execute()

    async def start(self) -> None:
        await self.beat()
        self._task = asyncio.create_task(self._loop(), name=f"heartbeat-{self._info.instance_id}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.beat()
            except (aioredis.RedisError, OSError) as e:
                # Keep beating: Redis may come back, and the lease lets peers route around us.
                log.warning("registry heartbeat failed: %s", e)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        with contextlib.suppress(aioredis.RedisError, OSError):
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.srem(members_key(self._info.group), self._info.instance_id)
                pipe.delete(instance_key(self._info.group, self._info.instance_id))
                await pipe.execute()


async def list_instances(
    client: aioredis.Redis, group: str | None = None
) -> list[InstanceInfo]:
    """Live instances of one group, or of all groups. Prunes member ids whose lease
    expired and groups left with no members (a racing registration re-adds itself at
    its next heartbeat). Two round trips in all, however many groups there are."""
    groups = [group] if group is not None else sorted(
        g.decode() for g in await client.smembers(GROUPS_KEY)
    )
    if not groups:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for g in groups:
            pipe.smembers(members_key(g))
        member_sets = await pipe.execute()
    ids_by_group = {g: sorted(i.decode() for i in m) for g, m in zip(groups, member_sets,
                                                                    strict=True)}
    keys = [instance_key(g, i) for g in groups for i in ids_by_group[g]]
    raws = await client.mget(keys) if keys else []
    out: list[InstanceInfo] = []
    it = iter(raws)
    async with client.pipeline(transaction=False) as pipe:
        for g in groups:
            ids = ids_by_group[g]
            got = [next(it) for _ in ids]
            dead = [i for i, raw in zip(ids, got, strict=True) if raw is None]
            if dead:
                pipe.srem(members_key(g), *dead)
            if len(dead) == len(ids):
                pipe.srem(GROUPS_KEY, g)
            out.extend(InstanceInfo.from_json(raw) for raw in got if raw is not None)
        await pipe.execute()
    return out


class RegistryView:
    """A live, polled snapshot of the registry (short poll; events are only hints)."""

    def __init__(self, client: aioredis.Redis, period_s: float = 0.5) -> None:
        self._client = client
        self._period_s = period_s
        self._instances: list[InstanceInfo] = []
        self._task: asyncio.Task[None] | None = None
        self.refreshed_at = 0.0

    def instances(self, role: str | None = None, group: str | None = None) -> list[InstanceInfo]:
        return [
            i for i in self._instances
            if (role is None or i.role == role) and (group is None or i.group == group)
        ]

    async def refresh(self) -> None:
        self._instances = await list_instances(self._client)
        self.refreshed_at = time.monotonic()

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="registry-view")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.refresh()
            except (aioredis.RedisError, OSError) as e:
                log.warning("registry refresh failed, keeping the last view: %s", e)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
