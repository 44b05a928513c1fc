"""Instance registry in Redis: who serves which role in which scenario group.

Layout (one hash tag per group, so a group's keys share a cluster slot):
  pdserve:groups                  SET of group names
  pdserve:{<group>}:members       SET of instance ids
  pdserve:{<group>}:inst:<id>     JSON InstanceInfo, with a TTL (the lease)

Every heartbeat rewrites the record with a fresh TTL, so a lost write or a Redis
failover heals at the next beat, and an instance that dies drops out when its
lease expires. Readers prune member ids whose record has expired.

Redis Cluster-safe: the per-group steps (heartbeat, deregistration, reads) touch one
group's keys only, as Lua scripts or single-key commands; ``pdserve:groups`` is only
ever touched by single-key commands. ``connect`` takes ``redis://``, ``rediss://`` and
``unix://`` URLs (one server) and ``redis+cluster://[user:pass@]host:port[,host:port...]``
(``rediss+cluster://`` with TLS) for a Redis Cluster, given by one or more seed nodes.

Redis away: every call is bounded by short timeouts, and the readers keep the last
view (``RegistryView``); instances keep beating and are whole again at their first
beat after Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from services.cluster.keys import EPOCH_KEY, GROUPS_KEY, instance_key, members_key
from services.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)
REDIS_ERRORS = (aioredis.RedisError, OSError)


def _credentials_refused(e: BaseException) -> bool:
    """Redis said no to the URL's credentials (redis-py's retry wraps the
    AuthenticationError in a ConnectionError, so look down the chain)."""
    seen: BaseException | None = e
    for _ in range(5):
        if seen is None:
            return False
        if isinstance(seen, redis.exceptions.AuthenticationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False
# Bounded calls: a dead Redis fails fast (callers degrade), a hung one within these.
SOCKET_TIMEOUT_S = 2.0
CONNECT_TIMEOUT_S = 1.0
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# After Redis lost its data (a restart, a failover without replicas) or after the view could
# not read it, instances reappear one by one at their next heartbeat. For this long, the
# view keeps the instances it knew and has not yet seen again (>= the default lease, 3 s).
REJOIN_GRACE_S = 3.0

_BEAT = """
redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
return 1
"""
_LEAVE = """
redis.call('SREM', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""
# Prune member ids whose record is gone, checked again inside the step: between a
# lister's SMEMBERS and GET an instance may re-register (a role switch is LEAVE then
# BEAT), and a plain SREM would drop its fresh membership until its next heartbeat.
# Returns how many members are left. KEYS[1] members, KEYS[2..] their records (one slot).
_PRUNE = """
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 0 then redis.call('SREM', KEYS[1], ARGV[i - 1]) end
end
return redis.call('SCARD', KEYS[1])
"""


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


def connect(url: str) -> Any:
    """An asyncio client: ``aioredis.Redis``, or ``RedisCluster`` for a cluster URL."""
    kw: dict[str, Any] = dict(
        decode_responses=False, socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        retry=Retry(ExponentialBackoff(cap=0.05, base=0.005), 1))
    scheme, sep, rest = url.partition("://")
    if scheme not in CLUSTER_SCHEMES:
        return aioredis.Redis.from_url(url, **kw)
    if not sep or not rest.split("/")[0]:
        raise ValueError(f"bad cluster URL {url!r}; expected redis+cluster://host:port[,...]")
    netloc = rest.split("/")[0]
    creds, _, hosts = netloc.rpartition("@")
    user, _, password = creds.partition(":")
    nodes = []
    for hp in hosts.split(","):
        host, _, port = hp.rpartition(":")
        nodes.append(ClusterNode(host or "127.0.0.1", int(port or 6379)))
    return RedisCluster(startup_nodes=nodes, username=user or None, password=password or None,
                        ssl=scheme == "rediss+cluster", **kw)


class Registration:
    """Keeps one instance's record alive until ``close``."""

    def __init__(
        self,
        client: Any,
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
        self.failing = False
        self.restored_at = 0.0  # monotonic time of the first beat after an outage
        self._beat = client.register_script(_BEAT)
        self._leave = client.register_script(_LEAVE)

    @property
    def info(self) -> InstanceInfo:
        return self._info

    async def beat(self) -> None:
        info = self._info
        if self._load_fn is not None:
            info = replace(info, load=self._load_fn())
        await self._beat(
            keys=[members_key(info.group), instance_key(info.group, info.instance_id)],
            args=[info.instance_id, info.to_json(), self._ttl_ms])
        await self._client.sadd(GROUPS_KEY, info.group)

    async def start(self) -> None:
        """First beat now; if Redis is away the instance still starts serving (peers that
        know its address reach it) and registers at the first beat that gets through."""
        try:
            await self.beat()
        except REDIS_ERRORS as e:
            if _credentials_refused(e):
                # Wrong or missing credentials are a setting to fix, not an outage to ride
                # out: the instance does not start.
                log.error("Redis refused this instance's credentials: check the password in "
                          "PDSERVE_REDIS_URL (redis://:PASSWORD@host:port/0)")
                raise
            log.warning("registry unreachable at start, serving and retrying: %s", e)
            self.failing = True
        self._task = asyncio.create_task(self._loop(), name=f"heartbeat-{self._info.instance_id}")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            try:
                await self.beat()
            except REDIS_ERRORS as e:
                # Keep beating: Redis may come back (the next beat re-registers us whole),
                # and the lease lets peers route around us meanwhile.
                if not self.failing:
                    log.warning("registry heartbeat failed, serving on: %s", e)
                self.failing = True
                continue
            if self.failing:
                log.warning("registry heartbeat restored: %s re-registered",
                            self._info.instance_id)
                self.failing = False
                self.restored_at = time.monotonic()

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        with contextlib.suppress(*REDIS_ERRORS):
            await self._leave(
                keys=[members_key(self._info.group),
                      instance_key(self._info.group, self._info.instance_id)],
                args=[self._info.instance_id])


async def list_instances(client: Any, group: str | None = None) -> list[InstanceInfo]:
    """Live instances of one group, or of all groups. Prunes member ids whose lease
    expired and groups left with no members (a racing registration re-adds itself at
    its next heartbeat). Three pipelined round trips however many groups there are; each
    command touches one group's slot (Redis Cluster-safe)."""
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
    async with client.pipeline(transaction=False) as pipe:
        for g in groups:
            for i in ids_by_group[g]:  # GETs, not MGET: a cluster pipeline refuses MGET
                pipe.get(instance_key(g, i))
        raws = iter(await pipe.execute())
    out: list[InstanceInfo] = []
    prune: list[tuple[str, list[str]]] = []
    for g in groups:
        ids = ids_by_group[g]
        got = [next(raws) for _ in ids]
        dead = [i for i, raw in zip(ids, got, strict=True) if raw is None]
        if dead or not ids:
            prune.append((g, dead))
        out.extend(InstanceInfo.from_json(raw) for raw in got if raw is not None)
    if prune:
        script = client.register_script(_PRUNE)
        for g, dead in prune:
            left = await script(keys=[members_key(g), *(instance_key(g, i) for i in dead)],
                                args=dead)
            if not left:
                # A group key is another slot, so this step is not atomic with the one
                # above: a registration racing it re-adds the group at its next heartbeat.
                await client.srem(GROUPS_KEY, g)
    return out


async def registry_epoch(client: Any) -> bytes:
    """A random token that lives as long as Redis keeps its data: a new one means the
    registry was lost (a restart without persistence) and is being rebuilt."""
    epoch = await client.get(EPOCH_KEY)
    if epoch is None:
        await client.set(EPOCH_KEY, uuid.uuid4().hex, nx=True)
        epoch = await client.get(EPOCH_KEY)
    return bytes(epoch or b"")


class RegistryView:
    """A live, polled snapshot of the registry (short poll; events are only hints). While
    Redis is away it keeps the last view: callers route on it rather than fail."""

    def __init__(self, client: Any, period_s: float = 0.5,
                 rejoin_grace_s: float = REJOIN_GRACE_S) -> None:
        self._client = client
        self._period_s = period_s
        self._rejoin_grace_s = rejoin_grace_s
        self._instances: list[InstanceInfo] = []
        self._task: asyncio.Task[None] | None = None
        self._epoch: bytes | None = None
        self._merge_until = 0.0
        self.refreshed_at = 0.0
        self.failing = False

    def instances(self, role: str | None = None, group: str | None = None) -> list[InstanceInfo]:
        return [
            i for i in self._instances
            if (role is None or i.role == role) and (group is None or i.group == group)
        ]

    async def refresh(self) -> bool:
        """Re-read the registry; False (and the last view kept) when Redis is away."""
        try:
            epoch = await registry_epoch(self._client)
            fresh = await list_instances(self._client)
        except REDIS_ERRORS as e:
            if not self.failing:
                log.warning("registry refresh failed, keeping the last view: %s", e)
            self.failing = True
            return False
        now = time.monotonic()
        if self.failing or (self._epoch is not None and epoch != self._epoch):
            # Redis was away or lost its data: members re-register at their next beat.
            log.warning("registry readable again (%d instances so far); keeping the last "
                        "view's others for %.1f s while they re-register", len(fresh),
                        self._rejoin_grace_s)
            self._merge_until = now + self._rejoin_grace_s
        self._epoch = epoch
        if now < self._merge_until:
            seen = {i.instance_id for i in fresh}
            fresh += [i for i in self._instances if i.instance_id not in seen]
        self._instances = fresh
        self.failing = False
        self.refreshed_at = now
        return True

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._loop(), name="registry-view")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._period_s)
            await self.refresh()

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
