"""The rejection-forwarding queue of each scenario group, shared by all gateways.

  pdserve:{<group>}:fwdq        ZSET "<request>|<gateway>" scored by deadline (unix ms)
  pdserve:{<group>}:offered     HASH entry -> until when a slot offered to it is its own
  pdserve:{<group>}:free        ZSET prefills whose freed slot no waiter took (briefly)
  pdserve:{<group>}:gateways    HASH gateway -> until when its entries count as alive
  pdserve:{<group>}:wake:<gw>   channel: a slot offered to one of that gateway's entries
  pdserve:{<group>}:qstate      channel: "1" when the queue turns non-empty, "0" empty

A request that every prefill rejected enters the ZSET; its own gateway keeps the client
stream. A prefill that frees a slot runs the OFFER script (``services.cluster.slotoffer``):
one round trip marks the group's earliest-deadline entry as offered and publishes the
offer to that entry's gateway, which wakes exactly that waiter. There is no polling on
this path: a slow poll (``poll_s``) remains only as a safety net, on which the head of
the queue retries (a lost offer, a prefill that cannot reach Redis). An offer that
reaches a request which already left is passed on at once.

Degraded mode: when Redis fails, the queue becomes gateway-local. Waiters are ordered by
deadline in this process, and a slot is offered locally when one of this gateway's
prefill streams ends (the prefill frees the slot then), with a short poll for slots that
other gateways' requests free. A background task probes Redis; when it answers, every
group's entries of this gateway are rewritten to the live waiters (RESYNC) and the
offers flow again. A request is owned by exactly one gateway stream, so it can be
neither lost to another gateway nor served twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from services.cluster import slotoffer
from services.cluster.keys import (
    QUEUE_STATE_PATTERN,
    gateways_key,
    group_of_channel,
    offered_key,
    queue_key,
    wake_pattern,
)
from services.common.tasks import cancel_and_wait
from services.gateway.scheduling import Waiting, offer_to, queue_order, split_expired
from services.gateway.scheduling import queue_key as entry_order

log = logging.getLogger(__name__)
REDIS_ERRORS = (aioredis.RedisError, OSError)
DEGRADED_POLL_S = 0.05  # without Redis, other gateways' freed slots are seen only by polling
RECOVERY_PROBE_S = 0.25
ALIVE_TTL_S = 5.0  # a gateway's queue entries outlive its last liveness refresh this long
ALIVE_PERIOD_S = 1.0
# An "empty" from the queue-state channel is trusted this long before Redis is asked again
# (bounds the effect of a lost event: newcomers skip a non-empty queue at most this long).
EMPTY_TRUST_S = 1.0
QUEUE_STATE_SUFFIX = ":qstate"


@dataclass
class _Waiter:
    group: str
    request_id: str
    deadline_ms: float
    offers: deque[tuple[str, float]] = field(default_factory=deque)  # (prefill, sent ms)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    marked: bool = False  # Redis holds an offer mark for it (cleared before waiting again)


@dataclass
class QueueStats:
    offers_received: int = 0
    offers_passed_on: int = 0
    safety_polls: int = 0
    outages: int = 0
    wake_ms: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    last_outage_s: float = 0.0  # from the first failed call to the end of the resync
    last_resync_at: float = 0.0  # monotonic time the queue was whole again


class ForwardingQueue:
    def __init__(self, client: aioredis.Redis, gateway_id: str, poll_s: float,
                 live_gateways: Any = None, degraded_poll_s: float = DEGRADED_POLL_S) -> None:
        # ``live_gateways`` is accepted for compatibility; liveness now lives in the group's
        # gateways hash, which the OFFER script can read atomically.
        self._client = client
        self._gateway_id = gateway_id
        self._poll_s = poll_s
        self._degraded_poll_s = degraded_poll_s
        self._waiters: dict[str, _Waiter] = {}
        self._groups: set[str] = set()  # groups this gateway ever queued in (for RESYNC)
        self._local_free: dict[str, deque[tuple[str, float]]] = {}
        # group -> (queue non-empty?, monotonic time learned), from the queue-state channel
        self._nonempty: dict[str, tuple[bool, float]] = {}
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._leaving: dict[str, set[asyncio.Task[None]]] = {}  # group -> pending removals
        self._alive_task: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self.degraded = False
        self.stats = QueueStats()

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        try:
            await self._subscribe()
        except REDIS_ERRORS as e:
            self._down(e)
        self._alive_task = asyncio.create_task(self._keep_alive(), name="fwdq-alive")

    async def _subscribe(self) -> None:
        if self._listener is not None:
            await cancel_and_wait(self._listener)
        if self._pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._pubsub.aclose()
        if isinstance(self._client, RedisCluster):
            # Classic pub/sub reaches every node over the cluster bus, so one node's
            # subscription sees every group's offers; the client must know the nodes first.
            await self._client.initialize()
        self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        self._nonempty.clear()  # events may have been missed: ask Redis again
        await self._pubsub.psubscribe(wake_pattern(self._gateway_id), QUEUE_STATE_PATTERN)
        self._listener = asyncio.create_task(self._listen(self._pubsub), name="fwdq-offers")

    async def close(self) -> None:
        for pending in self._leaving.values():  # let removals reach Redis
            await asyncio.gather(*pending, return_exceptions=True)
        for t in (self._listener, self._alive_task, self._recovery, *self._tasks):
            if t is not None:
                await cancel_and_wait(t)
        if self._pubsub is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._pubsub.aclose()

    # -- offers ------------------------------------------------------------------------

    async def _listen(self, pubsub: Any) -> None:
        while True:
            try:
                msg = await pubsub.get_message(timeout=1.0)
            except REDIS_ERRORS as e:
                self._down(e)
                return
            if msg is None:
                continue
            channel = msg["channel"].decode()
            if channel.endswith(QUEUE_STATE_SUFFIX):
                self._nonempty[group_of_channel(channel)] = (msg["data"] == b"1",
                                                            time.monotonic())
                continue
            try:
                group = group_of_channel(channel)
                m, prefill, sent = msg["data"].decode().split("\n")
            except ValueError:
                log.warning("ignoring a malformed offer on %r", msg["channel"])
                continue
            self.stats.offers_received += 1
            w = self._waiters.get(m)
            if w is None:  # it left (admitted, cancelled) after the offer was made
                self._spawn(self._pass_on(group, prefill))
                continue
            w.marked = True
            w.offers.append((prefill, float(sent)))
            w.event.set()

    async def _pass_on(self, group: str, prefill: str) -> None:
        self.stats.offers_passed_on += 1
        if self.degraded:
            self.on_prefill_done(group, prefill, force=True)
            return
        try:
            await slotoffer.offer_slot(self._client, group, prefill)
        except REDIS_ERRORS as e:
            self._down(e)

    def on_prefill_done(self, group: str, prefill: str, force: bool = False) -> None:
        """One of this gateway's prefill streams ended: that prefill freed a slot. With
        Redis up the prefill offers it itself; in degraded mode the offer is made here,
        to this gateway's earliest-deadline waiter (or remembered briefly)."""
        if not (self.degraded or force):
            return
        now = time.time() * 1000
        mine = {w.request_id: w for w in self._waiters.values() if w.group == group}
        # The policy core's rule (scheduling.offer_to), over this gateway's waiters; one
        # holding an offer (unused, or being tried) is skipped, as the OFFER script skips
        # a marked entry.
        head = offer_to([Waiting(rid, self._gateway_id, w.deadline_ms)
                         for rid, w in mine.items()],
                        {rid: math.inf for rid, w in mine.items() if w.offers or w.marked},
                        now)
        if head is not None:
            w = mine[head.request_id]
            w.marked = True
            w.offers.append((prefill, now))
            w.event.set()
            return
        free = self._local_free.setdefault(group, deque(maxlen=64))
        free.append((prefill, now))

    def _claim_local(self, group: str) -> str | None:
        free = self._local_free.get(group)
        now = time.time() * 1000
        while free:
            prefill, at = free.popleft()
            if now - at <= slotoffer.FREE_TTL_MS:
                return prefill
        return None

    # -- the waiter's side ---------------------------------------------------------------

    async def enter(self, group: str, request_id: str, deadline_ms: float) -> str | None:
        """Queue the request (``slotoffer.enter``): a prefill to ask first, "" to probe the
        prefills now, or None to wait for an offer."""
        m = slotoffer.member(request_id, self._gateway_id)
        self._waiters[m] = _Waiter(group, request_id, deadline_ms)
        self._groups.add(group)
        if not self.degraded:
            try:
                got = await slotoffer.enter(self._client, group, m, deadline_ms,
                                            self._gateway_id, self._alive_until())
                # An offer may have come in during the round trip: its mark must stay, or
                # the entry would keep Redis's offer mark (skipped by every offer for
                # OFFER_TTL_MS) with no one to clear it, and wait for the safety poll.
                self._waiters[m].marked |= bool(got)
                return got
            except REDIS_ERRORS as e:
                self._down(e)
        got = self._claim_local(group)
        if got is None:  # "" when every local waiter ahead already holds an offer
            me = entry_order(Waiting(request_id, self._gateway_id, deadline_ms))
            ahead = [w for k, w in self._waiters.items() if k != m and w.group == group
                     and not w.marked
                     and entry_order(Waiting(w.request_id, self._gateway_id, w.deadline_ms)) < me]
            got = None if ahead else ""
        self._waiters[m].marked |= bool(got)
        return got

    async def wait(self, group: str, request_id: str) -> str | None:
        """Until a slot is offered to this request (its prefill id) or the safety-net poll
        passes (None: the caller checks its rank)."""
        w = self._waiters[slotoffer.member(request_id, self._gateway_id)]
        if w.marked:  # a try on an earlier offer failed: be eligible for the next one
            w.marked = False
            if not self.degraded:
                try:
                    await self._client.hdel(offered_key(group),
                                            slotoffer.member(request_id, self._gateway_id))
                except REDIS_ERRORS as e:
                    self._down(e)
        if not w.offers:
            w.event.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._degraded_poll_s if self.degraded
                                           else self._poll_s):
                    await w.event.wait()
        if not w.offers:
            self.stats.safety_polls += 1
            return None
        prefill, sent = w.offers.popleft()
        self.stats.wake_ms.append(max(0.0, time.time() * 1000 - sent))
        return prefill

    async def leave(self, group: str, request_id: str) -> None:
        self.drop(group, request_id)

    def drop(self, group: str, request_id: str) -> None:
        """The request is done with the queue: a prefill accepted it, or it failed or was
        cancelled. Idempotent. Its Redis entry is removed in the background, so an
        accepted request neither waits a round trip nor, while its prefill computes, draws
        offers of other freed slots. ``depth`` waits for this gateway's pending removals."""
        m = slotoffer.member(request_id, self._gateway_id)
        w = self._waiters.pop(m, None)
        if w is None:
            return
        unused = [prefill for prefill, _ in w.offers]
        task = asyncio.get_running_loop().create_task(self._leave(group, m, unused))
        self._leaving.setdefault(group, set()).add(task)
        task.add_done_callback(self._leaving[group].discard)

    async def _leave(self, group: str, m: str, unused: list[str]) -> None:
        if not self.degraded:
            try:
                await slotoffer.leave(self._client, group, m)
            except REDIS_ERRORS as e:
                self._down(e)
        for prefill in unused:
            await self._pass_on(group, prefill)  # offers it never used go to the next one

    async def rank(self, group: str, request_id: str) -> int | None:
        """Position among the group's live entries; None once past its deadline. An entry
        Redis lost (a restart between two calls) is entered again."""
        m = slotoffer.member(request_id, self._gateway_id)
        w = self._waiters.get(m)
        now_ms = time.time() * 1000
        if w is not None and w.deadline_ms <= now_ms:
            return None
        if not self.degraded:
            try:
                return await self._redis_rank(group, m, now_ms, w)
            except REDIS_ERRORS as e:
                self._down(e)
        local = queue_order([Waiting(x.request_id, self._gateway_id, x.deadline_ms)
                             for x in self._waiters.values() if x.group == group])
        return next((i for i, e in enumerate(local) if e.request_id == request_id), None)

    async def _redis_rank(self, group: str, m: str, now_ms: float,
                          w: _Waiter | None) -> int | None:
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(queue_key(group), "-inf", now_ms)
            pipe.zrange(queue_key(group), 0, -1, withscores=True)
            pipe.hgetall(gateways_key(group))
            _, raw, gws = await pipe.execute()
        alive = {k.decode() for k, v in gws.items() if float(v) > now_ms}
        entries = []
        for member, score in raw:
            rid, gw = slotoffer.split_member(member.decode())
            if gw in alive or gw == self._gateway_id:
                entries.append(Waiting(rid, gw, float(score)))
        live, _ = split_expired(entries, now_ms)
        rid = slotoffer.split_member(m)[0]
        for i, e in enumerate(live):
            if e.request_id == rid and e.gateway_id == self._gateway_id:
                return i
        if w is None:
            return None
        await slotoffer.enter(self._client, group, m, w.deadline_ms, self._gateway_id,
                              self._alive_until())
        return len(live)

    async def settled(self) -> None:
        """Until this gateway's pending queue removals have reached Redis."""
        for pending in list(self._leaving.values()):
            await asyncio.gather(*pending, return_exceptions=True)

    async def depth(self, group: str) -> int:
        """How many wait in ``group`` (callers only ask whether any do). No round trip
        when this gateway has waiters there, in degraded mode, or when the queue-state
        channel said "empty" less than ``EMPTY_TRUST_S`` ago (the common case)."""
        local = sum(1 for w in self._waiters.values() if w.group == group)
        if local or self.degraded:
            return local
        nonempty, seen_at = self._nonempty.get(group, (True, 0.0))
        now = time.monotonic()
        if not nonempty and now - seen_at < EMPTY_TRUST_S:
            return 0
        if self._leaving.get(group):  # our own entries leave first
            await asyncio.gather(*self._leaving[group], return_exceptions=True)
        try:
            n = int(await self._client.zcard(queue_key(group)))
        except REDIS_ERRORS as e:
            self._down(e)
            return 0
        self._nonempty[group] = (n > 0, now)
        return n

    def waiting(self) -> int:
        return len(self._waiters)

    # -- liveness and outages ------------------------------------------------------------

    def _alive_until(self) -> int:
        return int((time.time() + ALIVE_TTL_S) * 1000)

    async def _keep_alive(self) -> None:
        while True:
            await asyncio.sleep(ALIVE_PERIOD_S)
            if self.degraded:
                continue
            for group in {w.group for w in self._waiters.values()}:
                try:
                    await self._client.hset(gateways_key(group), self._gateway_id,
                                            self._alive_until())
                except REDIS_ERRORS as e:
                    self._down(e)
                    break

    def _down(self, err: BaseException) -> None:
        if self.degraded:
            return
        self.degraded = True
        self._down_since = time.monotonic()
        self.stats.outages += 1
        log.warning("Redis unreachable (%s); the forwarding queue waits gateway-locally "
                    "until it is back", err)
        for w in self._waiters.values():
            w.event.set()  # re-check at the short local poll
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(), name="fwdq-recover")

    async def _recover(self) -> None:
        while True:
            await asyncio.sleep(RECOVERY_PROBE_S)
            try:
                await self._client.ping()
                await self._subscribe()
                for group in sorted(self._groups):
                    mine = {m: w.deadline_ms for m, w in self._waiters.items()
                            if w.group == group}
                    await slotoffer.resync(self._client, group, self._gateway_id,
                                           self._alive_until(), mine)
            except REDIS_ERRORS:
                continue
            for w in self._waiters.values():
                w.marked = False
                w.event.set()  # offers flow again; waiters re-check their rank now
            self.degraded = False
            self.stats.last_resync_at = time.monotonic()
            self.stats.last_outage_s = self.stats.last_resync_at - self._down_since
            log.warning("Redis is back; forwarding queue resynced after %.2f s",
                        self.stats.last_outage_s)
            return

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
