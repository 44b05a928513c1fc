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

The live gateway, a mock cluster and the simulator (``bench/sim``) drive the same
functions: ``prefill_order`` (live, over a registry snapshot) and the simulator both rank
through ``order_ids`` over a ``policy.LoadIndex``; the queue is ordered by ``queue_key``;
``offer_to`` is the wake-up rule (whom a freed slot is offered to) and ``may_retry`` the
safety-net poll's.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from services.gateway.policy import Candidate, LoadIndex


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


def order_ids(
    policy: Policy,
    group: str,
    index: LoadIndex,
    tick: int,
    filler: BatchFiller | None = None,
    loads: Mapping[str, Load] | None = None,
    exclude: frozenset[str] = frozenset(),
) -> Iterator[str]:
    """The prefills to ask, in order, lazily: the policy core. ``index`` holds the group's
    prefills (registry order) with this gateway's open-stream counts. ``forward`` yields
    the batch-filling prefill first, then fewest open streams; the queueing policies
    yield exactly one. Only ``reported-queue`` scans (the reports are a snapshot)."""
    n = len(index)
    if n == 0:
        return
    if policy is Policy.FORWARD:
        fill = filler.filling.get(group) if filler else None
        if fill is not None and fill in index and fill not in exclude:
            yield fill
        for iid in index.ranked(tick):
            if iid != fill and iid not in exclude:
                yield iid
        return
    if policy is Policy.RR_QUEUE:
        live = [iid for iid in sorted(index) if iid not in exclude] if exclude else sorted(index)
        if live:
            yield live[tick % len(live)]
        return
    if policy is Policy.LOS_QUEUE:
        for iid in index.ranked(tick):
            if iid not in exclude:
                yield iid
                return
        return
    loads = loads or {}
    cands = [iid for iid in index if iid not in exclude]
    if cands:
        m = len(cands)
        best = min(range(m), key=lambda i: (loads.get(cands[i], Load()).per_slot,
                                            (i - tick) % m))
        yield cands[best]


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
    """The prefills to ask, in order (``order_ids`` over a snapshot). Queueing policies
    return exactly one."""
    cands = [c for c in candidates if c.instance_id not in exclude]
    if not cands:
        return []
    by_id = {c.instance_id: c for c in cands}
    index = LoadIndex((c.instance_id for c in cands), open_streams)
    return [by_id[iid] for iid in order_ids(policy, group, index, tick, filler, loads)]


@dataclass(frozen=True)
class Waiting:
    """One entry of a group's rejection-forwarding queue."""

    request_id: str
    gateway_id: str
    deadline_ms: float  # unix ms; the queue is ordered by it (earliest first)


def queue_key(e: Waiting) -> tuple[float, str]:
    """The forwarding queue's order: earliest deadline first; ties by request id so every
    gateway sees one order."""
    return (e.deadline_ms, e.request_id)


def queue_order(entries: Sequence[Waiting]) -> list[Waiting]:
    return sorted(entries, key=queue_key)


def split_expired(entries: Sequence[Waiting], now_ms: float) -> tuple[list[Waiting], list[Waiting]]:
    live = [e for e in entries if e.deadline_ms > now_ms]
    expired = [e for e in entries if e.deadline_ms <= now_ms]
    return queue_order(live), queue_order(expired)


def may_retry(rank: int | None, prefills: int) -> bool:
    """Only the first ``prefills`` waiting requests of a group probe on a wake-up: as many
    as could possibly be admitted at once, so gateways share the queue fairly and the
    earliest deadlines go first. ``rank`` is the 0-based position, None if not queued."""
    return rank is not None and rank < max(1, prefills)



def offer_to(entries: Sequence[Waiting], offered_until: Mapping[str, float],
             now_ms: float) -> Waiting | None:
    """Whom a freed prefill slot is offered to: the earliest-deadline live entry (by
    ``queue_key``) that holds no unexpired offer; None when no one waits (the slot is then
    remembered briefly for a newcomer). The live queue runs this rule atomically in Redis
    (``services.cluster.slotoffer``'s OFFER script, which also skips entries of dead
    gateways); the simulator runs it here, and an integration test holds the two equal."""
    live = [e for e in entries if may_offer(e, offered_until, now_ms)]
    return min(live, key=queue_key) if live else None


def may_offer(e: Waiting, offered_until: Mapping[str, float], now_ms: float) -> bool:
    """An entry can take an offer: before its deadline, and not holding one already."""
    return e.deadline_ms > now_ms and offered_until.get(e.request_id, 0.0) <= now_ms


def probe_on_enter(ahead: Sequence[Waiting], offered_until: Mapping[str, float],
                   now_ms: float) -> bool:
    """A newcomer that joins a non-empty queue probes the prefills at once when everyone
    ahead of it already holds an offer (they are being admitted and about to leave);
    otherwise it waits for a freed slot. The live ENTER script runs this rule in Redis."""
    return not any(may_offer(e, offered_until, now_ms) for e in ahead)
