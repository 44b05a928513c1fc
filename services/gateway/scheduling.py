"""Prefill scheduling policy (P/D-Serve §1.5), pure: no I/O, no clock reads.

Four policies share one shape: given the group's prefills and what the gateway
knows, return the order in which to ask them.

- ``forward`` (P/D-Serve): prefills have no local queue and reject when full. Ask
  them one after another until one accepts; the prefill that accepted last is
  asked first again (batch filling: keep an idle prefill filling until it
  rejects). When all reject, the request waits in the group's shared queue,
  ordered by deadline, and retries when woken.
- ``rr-queue``: round robin; the chosen prefill queues the request locally (FIFO).
- ``los-queue``: least open streams (SSE connections, whole lifetime) at this gateway;
  local queue. This is P/D-Serve's old design.
- ``reported-queue``: least reported load (busy + queued per slot) from the
  prefills' periodic heartbeats; local queue. Reports are stale by up to a period.

The live gateway, a mock cluster and a simulator drive the same functions.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from services.gateway.policy import Candidate, rank_least_open_streams


class Policy(enum.StrEnum):
    FORWARD = "forward"
    RR_QUEUE = "rr-queue"
    LOS_QUEUE = "los-queue"
    REPORTED_QUEUE = "reported-queue"

    @property
    def rejects(self) -> bool:
        """True when prefills answer REJECTED instead of queueing locally."""
        return self is Policy.FORWARD

    @property
    def lifetime_streams(self) -> bool:
        """True when a prefill's open-stream count covers the request's whole stream,
        decode included: P/D-Serve's old design ranked prefills by SSE connections, which
        "cannot show whether the prefill step is finished" (§1.5). The others count a
        stream only until its KV is handed off."""
        return self is Policy.LOS_QUEUE


@dataclass(frozen=True)
class Load:
    """A prefill's last heartbeat report."""

    busy: float = 0.0
    queued: float = 0.0
    slots: float = 1.0

    @property
    def per_slot(self) -> float:
        return (self.busy + self.queued) / max(self.slots, 1.0)


@dataclass
class BatchFiller:
    """Which prefill of each group is being filled (accepted last, not rejected since)."""

    filling: dict[str, str] = field(default_factory=dict)

    def on_accept(self, group: str, instance_id: str) -> None:
        self.filling[group] = instance_id

    def on_reject(self, group: str, instance_id: str) -> None:
        if self.filling.get(group) == instance_id:
            del self.filling[group]


def prefill_order(
    policy: Policy,
    group: str,
    candidates: Sequence[Candidate],
    open_streams: Mapping[str, int],
    tick: int,
    filler: BatchFiller | None = None,
    loads: Mapping[str, Load] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> list[Candidate]:
    """The prefills to ask, in order. Queueing policies return exactly one."""
    cands = [c for c in candidates if c.instance_id not in exclude]
    if not cands:
        return []
    if policy is Policy.FORWARD:
        ranked = rank_least_open_streams(cands, open_streams, tick)
        fill = filler.filling.get(group) if filler else None
        head = [c for c in ranked if c.instance_id == fill]
        return head + [c for c in ranked if c.instance_id != fill]
    if policy is Policy.RR_QUEUE:
        return [sorted(cands, key=lambda c: c.instance_id)[tick % len(cands)]]
    if policy is Policy.LOS_QUEUE:
        return rank_least_open_streams(cands, open_streams, tick)[:1]
    loads = loads or {}
    n = len(cands)
    best = min(range(n), key=lambda i: (loads.get(cands[i].instance_id, Load()).per_slot,
                                        (i - tick) % n))
    return [cands[best]]


@dataclass(frozen=True)
class Waiting:
    """One entry of a group's rejection-forwarding queue."""

    request_id: str
    gateway_id: str
    deadline_ms: float  # unix ms; the queue is ordered by it (earliest first)


def queue_order(entries: Sequence[Waiting]) -> list[Waiting]:
    """Earliest deadline first; ties by request id so every gateway sees one order."""
    return sorted(entries, key=lambda e: (e.deadline_ms, e.request_id))


def split_expired(entries: Sequence[Waiting], now_ms: float) -> tuple[list[Waiting], list[Waiting]]:
    live = [e for e in entries if e.deadline_ms > now_ms]
    expired = [e for e in entries if e.deadline_ms <= now_ms]
    return queue_order(live), queue_order(expired)


def may_retry(rank: int | None, prefills: int) -> bool:
    """Only the first ``prefills`` waiting requests of a group probe on a wake-up: as many
    as could possibly be admitted at once, so gateways share the queue fairly and the
    earliest deadlines go first. ``rank`` is the 0-based position, None if not queued."""
    return rank is not None and rank < max(1, prefills)
