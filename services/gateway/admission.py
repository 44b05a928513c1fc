"""Getting a request into a prefill: the live side of ``scheduling``.

``forward`` (default): ask the group's prefills in policy order with
ADMISSION_MODE_REJECT_IF_BUSY. A rejection costs one short RPC; the next prefill
is asked at once. When all have rejected, the request enters the group's Redis
forwarding queue and waits until a freed slot is offered to it (fwdqueue.py: the
earliest deadline gets each freed slot, no polling), then asks that prefill first.
The TTFT deadline bounds all of it: the caller's timeout ends the request with
DEADLINE_EXCEEDED and the queue entry is removed. Without Redis the queue is
gateway-local (degraded mode), never an error.

The queueing baselines send the request to one prefill with ADMISSION_MODE_QUEUE
and let it wait there.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc

from pdserve.v1 import prefill_service_pb2, prefill_service_pb2_grpc
from services.cluster.registry import InstanceInfo
from services.common.errors import (
    DeadlineExceeded,
    PdserveError,
    ResourceExhausted,
    Unavailable,
    error_info,
    from_rpc_error,
)
from services.gateway.fwdqueue import ForwardingQueue
from services.gateway.policy import Candidate
from services.gateway.scheduling import (
    BatchFiller,
    Load,
    Policy,
    may_retry,
    prefill_order,
)
from services.observe.metrics import RequestMetrics


@dataclass
class Admitted:
    first_token: int
    call: grpc.aio.UnaryStreamCall
    instance_id: str
    prefill_ms: float


@dataclass
class AdmissionStats:
    rejections_total: int = 0
    forwarded_total: int = 0  # admitted by a prefill other than the first one asked
    queued_total: int = 0  # had to wait in the forwarding queue


class PrefillAdmission:
    def __init__(
        self,
        policy: Policy,
        find: Callable[[str, str], Awaitable[list[InstanceInfo]]],
        channel: Callable[[str], grpc.aio.Channel],
        open_streams: Counter[str],
        queue: ForwardingQueue | None,
        max_queue_s: float,
    ) -> None:
        self.policy = policy
        self._find = find
        self._channel = channel
        self.open_streams = open_streams
        self.queue = queue
        self.max_queue_s = max_queue_s
        self.filler = BatchFiller()
        self.stats = AdmissionStats()
        self._tick = itertools.count()
        self.metrics: RequestMetrics | None = None  # Prometheus (services/observe/metrics.py)
        # Re-reads the registry: an offer can come from a prefill that joined the group
        # after this gateway's last poll (servicer sets it to its view's refresh).
        self.refresh_view: Callable[[], Awaitable[object]] | None = None

    async def admit(self, preq: prefill_service_pb2.PrefillRequest, group: str,
                    on_accepted: Callable[[], None]) -> Admitted:
        mode = (prefill_service_pb2.ADMISSION_MODE_REJECT_IF_BUSY if self.policy.rejects
                else prefill_service_pb2.ADMISSION_MODE_QUEUE)
        preq.admission_mode = mode
        rid = preq.request_id
        queue = self.queue

        def accepted() -> None:
            on_accepted()
            if queue is not None:  # off the queue at once, not at the first token
                queue.drop(group, rid)

        rejected: set[str] = set()
        asked = 0
        queued = False
        offer: str | None = None
        last_error: PdserveError | None = None
        try:
            while True:
                insts = await self._known(group, offer)
                if (self.policy.rejects and self.queue is not None and not queued
                        and await self.queue.depth(group) > 0):
                    # Others are already waiting: join the queue instead of jumping it, so
                    # the group stays earliest-deadline-first.
                    queued = True
                    offer = await self._enter(preq, group)
                    if offer is None:  # "" = no one waits ahead without an offer: probe now
                        offer = await self._wait_turn(group, rid)
                    if offer:
                        self.filler.on_accept(group, offer)  # ask the freed prefill first
                    insts = await self._known(group, offer)  # it may have changed meanwhile
                by_id = {i.instance_id: i for i in insts}
                cands = [Candidate(i.instance_id, i.slots) for i in insts]
                loads = {i.instance_id: Load(i.load.get("busy", 0.0), i.load.get("queued", 0.0),
                                             i.load.get("slots", float(i.slots or 1)))
                         for i in insts}
                order = prefill_order(self.policy, group, cands, self.open_streams,
                                      next(self._tick), self.filler, loads, frozenset(rejected))
                busy = 0
                for cand in order:
                    asked += 1
                    try:
                        got = await self._try(by_id[cand.instance_id], preq, accepted)
                    except _Vanished as e:  # gone before it started: ask the next one
                        rejected.add(cand.instance_id)
                        last_error = e.err
                        continue
                    if got is None:
                        busy += 1
                        self.stats.rejections_total += 1
                        self.filler.on_reject(group, cand.instance_id)
                        rejected.add(cand.instance_id)
                        continue
                    self.filler.on_accept(group, cand.instance_id)
                    if asked > 1:
                        self.stats.forwarded_total += 1
                        if self.metrics is not None:
                            self.metrics.forwarded(group)
                    return got
                if order and busy == 0 and last_error is not None:
                    raise last_error  # every prefill is unreachable, none is merely busy
                if not self.policy.rejects:
                    raise last_error or Unavailable(f"no prefill in group {group!r} is reachable",
                                                    reason="NO_PREFILL")
                if self.queue is None:
                    raise ResourceExhausted(f"every prefill of group {group!r} is busy",
                                            reason="PREFILLS_BUSY", metadata={"group": group})
                offer = None
                if not queued:
                    queued = True
                    offer = await self._enter(preq, group)
                if not offer:  # it has just asked every prefill: wait for a freed slot
                    offer = await self._wait_turn(group, rid)
                if offer:
                    self.filler.on_accept(group, offer)  # ask the freed prefill first
                rejected.clear()
        finally:
            if queued and self.queue is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(self.queue.leave(group, rid))

    async def _known(self, group: str, offer: str | None) -> list[InstanceInfo]:
        """The group's prefills, including the one that offered a slot: a prefill offers
        its free slots as soon as it joins, possibly before this gateway's view has it."""
        insts = await self._find("prefill", group)
        if offer and self.refresh_view is not None and \
                all(i.instance_id != offer for i in insts):
            await self.refresh_view()
            insts = await self._find("prefill", group)
        return insts

    async def _enter(self, preq: prefill_service_pb2.PrefillRequest, group: str) -> str | None:
        """Queue the request: a prefill to ask first, "" to probe now, None to wait."""
        assert self.queue is not None
        deadline_ms = preq.ttft_deadline_unix_ms or (time.time() + self.max_queue_s) * 1000
        self.stats.queued_total += 1
        if self.metrics is not None:
            self.metrics.queued(group)
        return await self.queue.enter(group, preq.request_id, deadline_ms)

    async def _wait_turn(self, group: str, rid: str) -> str | None:
        """Until a freed slot is offered to this request (the prefill to ask first). On the
        safety-net poll (a lost offer), the head of the queue retries without one (None)."""
        assert self.queue is not None
        while True:
            offer = await self.queue.wait(group, rid)
            if offer is not None:
                return offer
            rank = await self.queue.rank(group, rid)
            if rank is None:
                raise DeadlineExceeded(
                    "the request waited in the forwarding queue past its deadline",
                    metadata={"group": group})
            if may_retry(rank, 1):
                return None

    async def _try(self, inst: InstanceInfo, preq: prefill_service_pb2.PrefillRequest,
                   on_accepted: Callable[[], None]) -> Admitted | None:
        """Ask one prefill. None: rejected. ``_Vanished``: unreachable before it started,
        so another prefill may be asked. Any other failure ends the request."""
        stub = prefill_service_pb2_grpc.PrefillServiceStub(self._channel(inst.address))
        call = stub.Prefill(preq)
        self.open_streams[inst.instance_id] += 1
        started = handed = False
        try:
            async for ev in call:
                kind = ev.WhichOneof("event")
                if kind == "rejected":
                    if self.metrics is not None:
                        self.metrics.admission(preq.scenario, False, prefill_service_pb2.
                                               RejectReason.Name(ev.rejected.reason))
                    return None
                started = True
                if kind == "accepted":
                    if self.metrics is not None:
                        self.metrics.admission(preq.scenario, True)
                    on_accepted()
                elif kind == "first_token":
                    handed = True
                    if self.queue is not None:  # the slot frees when this stream ends
                        call.add_done_callback(_on_done(self.queue, preq.scenario,
                                                        inst.instance_id))
                    return Admitted(int(ev.first_token.token_id), call, inst.instance_id,
                                    ev.first_token.prefill_ms)
            raise Unavailable(f"prefill {inst.instance_id} ended without a first token")
        except grpc.aio.AioRpcError as e:
            err = from_rpc_error(e, f"prefill {inst.instance_id}")
            # Unreachable (no answer with our ErrorInfo) before it started: ask another. A
            # prefill that answered UNAVAILABLE itself (its kvstore is down) ends the request
            # with that reason rather than parking it in the queue until its deadline.
            if not started and e.code() == grpc.StatusCode.UNAVAILABLE and error_info(e) is None:
                raise _Vanished(err) from e
            raise err from e
        finally:
            if not handed:
                call.cancel()
                self.open_streams[inst.instance_id] -= 1


def _on_done(queue: ForwardingQueue, group: str, instance_id: str) -> Callable[[object], None]:
    return lambda _call: queue.on_prefill_done(group, instance_id)


class _Vanished(Exception):
    """The prefill was unreachable before it started the request."""

    def __init__(self, err: PdserveError) -> None:
        super().__init__(str(err))
        self.err = err
