"""The rejection-forwarding queue of each scenario group, shared by all gateways.

  pdserve:{<group>}:fwdq      ZSET  member "<gateway_id>|<request_id>", score = deadline (unix ms)
  pdserve:{<group>}:slotfree  channel; a prefill publishes its id when it frees a slot

A request that every prefill rejected enters the ZSET. Its own gateway keeps
the client stream and retries when woken. A wake-up is a slot-free message or a
short poll: pub/sub is fire-and-forget, so it is only a hint. Only the first N
live entries of the group may retry, N being the number of prefills
(``scheduling.may_retry``), which keeps gateways fair and earliest deadlines first.
Entries past their deadline, or owned by a gateway that is no longer registered,
never block anyone. A request is owned by exactly one gateway stream, so it can
be neither lost to another gateway nor served twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import redis.asyncio as aioredis

from services.common.keys import SLOTFREE_PATTERN, group_of_channel, queue_key
from services.common.tasks import cancel_and_wait
from services.gateway.scheduling import Waiting, split_expired

log = logging.getLogger(__name__)


class ForwardingQueue:
    def __init__(self, client: aioredis.Redis, gateway_id: str, poll_s: float,
                 live_gateways: Callable[[], set[str]] | None = None) -> None:
        self._client = client
        self._gateway_id = gateway_id
        self._poll_s = poll_s
        self._live_gateways = live_gateways
        self._events: dict[str, asyncio.Event] = {}
        # Slot-free hints seen per group (a running count) and the latest freed prefills.
        self._freed_count: dict[str, int] = {}
        self._freed_last: dict[str, list[str]] = {}
        self._pubsub: aioredis.client.PubSub | None = None
        self._task: asyncio.Task[None] | None = None

    def _member(self, request_id: str) -> str:
        return f"{self._gateway_id}|{request_id}"

    async def start(self) -> None:
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        await self._pubsub.psubscribe(SLOTFREE_PATTERN)
        self._task = asyncio.create_task(self._listen(), name="fwdq-wakeups")

    async def _listen(self) -> None:
        assert self._pubsub is not None
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except (aioredis.RedisError, OSError) as e:
                log.warning("slot-free subscription failed, relying on polling: %s", e)
                await asyncio.sleep(1.0)
                continue
            if msg is None:
                continue
            group = group_of_channel(msg["channel"].decode())
            self._freed_count[group] = self._freed_count.get(group, 0) + 1
            last = self._freed_last.setdefault(group, [])
            last.append(msg["data"].decode())
            del last[:-16]
            if group in self._events:
                self._events[group].set()

    async def enter(self, group: str, request_id: str, deadline_ms: float) -> None:
        await self._client.zadd(queue_key(group), {self._member(request_id): deadline_ms})

    async def leave(self, group: str, request_id: str) -> None:
        await self._client.zrem(queue_key(group), self._member(request_id))

    async def rank(self, group: str, request_id: str) -> int | None:
        """Position among live entries (None if not queued); prunes expired entries."""
        now_ms = time.time() * 1000
        key = queue_key(group)
        await self._client.zremrangebyscore(key, "-inf", now_ms)
        raw = await self._client.zrange(key, 0, -1, withscores=True)
        alive = self._live_gateways() if self._live_gateways is not None else None
        entries = []
        for member, score in raw:
            gw, _, rid = member.decode().partition("|")
            if alive is None or gw in alive or gw == self._gateway_id:
                entries.append(Waiting(rid, gw, float(score)))
        live, _ = split_expired(entries, now_ms)
        for i, e in enumerate(live):
            if e.request_id == request_id and e.gateway_id == self._gateway_id:
                return i
        return None

    async def wait(self, group: str) -> None:
        """Until a slot frees in ``group`` or the poll period passes."""
        ev = self._events.setdefault(group, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ev.wait(), self._poll_s)
        ev.clear()

    def freed(self, group: str) -> int:
        """How many slot-free hints this gateway has seen for ``group`` (a running count)."""
        return self._freed_count.get(group, 0)

    def freed_since(self, group: str, seen: int) -> list[str]:
        """The prefills freed after the count was ``seen`` (newest last; bounded)."""
        n = self.freed(group) - seen
        return self._freed_last.get(group, [])[-n:] if n > 0 else []

    async def depth(self, group: str) -> int:
        return int(await self._client.zcard(queue_key(group)))

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
        if self._pubsub is not None:
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self._pubsub.aclose()
