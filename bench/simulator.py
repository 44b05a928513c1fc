"""A request-level discrete-event simulator of a pdserve cluster's prefill scheduling.

It drives the *same* pure policy code as the live gateway (``services.gateway.scheduling``:
``prefill_order``, ``BatchFiller``, ``queue_order``, ``may_retry``; ``policy.rank_decodes``)
under a virtual clock, with the mock engine's latency model (``LatencyModel``) standing in
for the model. It exists because a 2-core machine running 14 real processes saturates
long before the modelled cluster does: the live bench (``bench/scheduling.py``) validates
the mechanism, the simulator measures the policies at the loads where they differ.

What is modelled, per scenario group (requests never cross groups):
- prefills with ``slots`` (b_p) each. ``forward``: no local queue, TRY answers accept or
  reject after half a round trip, and the gateway asks the next one. Queueing policies:
  one prefill is chosen and keeps a local FIFO.
- the forwarding queue: earliest deadline first, shared by all gateways; a freed slot
  wakes the head waiting request, which asks the freed prefill first; a newcomer joins
  a non-empty queue instead of jumping it; an entry is dropped at its deadline.
- early intervention, for every policy: a prefill checks the deadline before and after
  compute, and the request fails (DEADLINE_EXCEEDED) when it has passed.
- the slot is held until the KV is handed off (``kv_bytes / kv_gbps``).
- decode: least open streams with a free slot; its time is ``out_len`` steps of the
  latency model at the batch size it joined with (request-level, not per step).
- gateways (``gateways``) each keep their own open-stream counts and batch filler.
  "Open streams" on a prefill mean what the policy reads: for ``forward`` the streams
  still in their prefill phase (try → KV handoff); for ``los-queue`` the request's whole
  SSE lifetime, decode included, as in P/D-Serve's old design (§1.5: the SSE count
  "cannot show whether the prefill step is finished"); ``lop-queue`` is the stronger
  variant that counts only the prefill phase (join-shortest-queue), shown for honesty.
- ``reported-queue`` sees (busy + queued) per slot as reported every ``report_ms``.

Invariants (tested): every request ends exactly once; a prefill never holds more than
b_p requests; the clock never goes back; a run is a deterministic function of its input.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.engine.mock import LatencyModel
from services.gateway.policy import Candidate, rank_decodes
from services.gateway.scheduling import BatchFiller, Load, Policy, may_retry, prefill_order

LOP_QUEUE = "lop-queue"  # least open *prefill-phase* streams, local FIFO (simulator only)
SIM_POLICIES = [p.value for p in Policy] + [LOP_QUEUE]


@dataclass(frozen=True)
class SimConfig:
    policy: str
    groups: int = 2
    prefills_per_group: int = 4
    decodes_per_group: int = 2
    slots: int = 1
    decode_slots: int = 64
    gateways: int = 2
    rtt_ms: float = 1.0  # one TRY round trip, gateway <-> prefill
    kv_bytes_per_token: int = 12 * 1024
    kv_gbps: float = 10.0
    report_ms: float = 100.0
    slo_factor: float = 4.0
    slo_floor_ms: float = 300.0
    # Early intervention also ends a request whose prefill cannot finish by its deadline
    # (the prefill's own estimate of its compute time), instead of spending the slot on it.
    predictive: bool = True


@dataclass(frozen=True)
class SimRequest:
    arrival_ms: float
    prompt_len: int
    output_len: int
    group: int


@dataclass
class Result:
    ok: bool  # got a first token (possibly late)
    ttft_ms: float
    slo_ms: float
    end_ms: float
    waited_in_queue: bool = False

    @property
    def slo_met(self) -> bool:
        return self.ok and self.ttft_ms <= self.slo_ms


@dataclass
class _Req:
    idx: int
    spec: SimRequest
    gateway: int
    arrival: float
    deadline: float
    slo_ms: float
    state: str = "new"  # new | trying | waiting | queued-local | prefill | decode | done
    queued: bool = False
    prefill: str = ""
    excluded: set[str] = field(default_factory=set)


@dataclass
class _Prefill:
    pid: str
    group: str
    busy: int = 0
    fifo: deque[_Req] = field(default_factory=deque)
    reported: Load = field(default_factory=Load)


class Simulator:
    def __init__(self, cfg: SimConfig, latency: LatencyModel) -> None:
        self.cfg = cfg
        self.lat = latency
        self.policy = Policy(cfg.policy) if cfg.policy != LOP_QUEUE else Policy.LOS_QUEUE
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.prefills: dict[str, list[_Prefill]] = {}
        self.decodes: dict[str, list[str]] = {}
        for g in range(cfg.groups):
            name = f"g{g}"
            self.prefills[name] = [_Prefill(f"{name}-p{i}", name)
                                   for i in range(cfg.prefills_per_group)]
            self.decodes[name] = [f"{name}-d{i}" for i in range(cfg.decodes_per_group)]
        self._by_id = {p.pid: p for ps in self.prefills.values() for p in ps}
        self.decode_active: Counter[str] = Counter()
        self.open_streams = [Counter[str]() for _ in range(cfg.gateways)]
        self.fillers = [BatchFiller() for _ in range(cfg.gateways)]
        self.ticks = [itertools.count() for _ in range(cfg.gateways)]
        self.fwdq: dict[str, list[_Req]] = {g: [] for g in self.prefills}
        self.results: dict[int, Result] = {}
        self.max_busy_seen = 0
        self._on_end: Callable[[int], None] | None = None
        self._first: dict[int, float] = {}
        self._lifetime_streams = cfg.policy != LOP_QUEUE and self.policy.lifetime_streams

    # -- event loop -----------------------------------------------------------------
    def at(self, t: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(t, self.now), next(self._seq), fn))

    def run(self, requests: Sequence[SimRequest], closed_users: int = 0) -> list[Result]:
        """Open loop: each request arrives at its ``arrival_ms``. Closed loop
        (``closed_users`` > 0): that many users, each sending the next request of the
        sequence when its last one ended."""
        reqs = list(requests)
        if closed_users > 0:
            pending = iter(range(len(reqs)))

            def next_for_user(_: int) -> None:
                i = next(pending, None)
                if i is not None:
                    self.at(self.now, lambda: self._arrive(i, reqs[i]))

            self._on_end = next_for_user
            for _ in range(min(closed_users, len(reqs))):
                next_for_user(-1)
        else:
            for i, r in enumerate(reqs):
                self.at(r.arrival_ms, lambda i=i, r=r: self._arrive(i, r))
        if self.policy is Policy.REPORTED_QUEUE:
            self.at(0.0, self._report)
        while self._heap:
            t, _, fn = heapq.heappop(self._heap)
            assert t >= self.now, "the clock went back"
            self.now = t
            fn()
            if self.policy is Policy.REPORTED_QUEUE and len(self.results) == len(reqs):
                break
        return [self.results[i] for i in range(len(reqs))]

    def _report(self) -> None:
        for p in self._by_id.values():
            p.reported = Load(float(p.busy), float(len(p.fifo)), float(self.cfg.slots))
        self.at(self.now + self.cfg.report_ms, self._report)

    # -- request lifecycle ----------------------------------------------------------
    def _arrive(self, i: int, spec: SimRequest) -> None:
        slo = self.cfg.slo_factor * self.lat.prefill_ms(spec.prompt_len) + self.cfg.slo_floor_ms
        r = _Req(i, spec, i % self.cfg.gateways, self.now, self.now + slo, slo)
        self.at(r.deadline, lambda: self._deadline(r))
        group = f"g{spec.group % self.cfg.groups}"
        if self.policy.rejects:
            q = self.fwdq[group]
            if q:  # others wait already: join, keep the group earliest-deadline-first
                self._enqueue(r, group)
                if may_retry(self._rank(r, group), len(self.prefills[group])):
                    self._try_round(r, group)
                return
            self._try_round(r, group)
            return
        order = self._order(r, group)
        self._route_local(r, order[0])

    def _order(self, r: _Req, group: str) -> list[Candidate]:
        gw = r.gateway
        cands = [Candidate(p.pid, self.cfg.slots) for p in self.prefills[group]]
        loads = {p.pid: p.reported for p in self.prefills[group]}
        return prefill_order(self.policy, group, cands, self.open_streams[gw],
                             next(self.ticks[gw]), self.fillers[gw], loads,
                             frozenset(r.excluded))

    def _try_round(self, r: _Req, group: str, first: str | None = None) -> None:
        r.state = "trying"
        r.excluded = set()
        order = [c.instance_id for c in self._order(r, group)]
        if first is not None and first in order:
            order.remove(first)
            order.insert(0, first)
        self._ask(r, group, order, 0)

    def _ask(self, r: _Req, group: str, order: list[str], k: int) -> None:
        if r.state == "done":
            return
        if k >= len(order):  # every prefill rejected: wait in the group's queue
            r.state = "waiting"
            if not r.queued:
                self._enqueue(r, group)
            return
        gw = r.gateway
        pid = order[k]
        self.open_streams[gw][pid] += 1

        def at_prefill() -> None:
            p = self._by_id[pid]
            if r.state == "done" or p.busy >= self.cfg.slots:
                self.at(self.now + self.cfg.rtt_ms / 2, lambda: rejected())
                return
            self._start_prefill(r, p)

        def rejected() -> None:
            self.open_streams[gw][pid] -= 1
            self.fillers[gw].on_reject(group, pid)
            self._ask(r, group, order, k + 1)

        self.at(self.now + self.cfg.rtt_ms / 2, at_prefill)

    def _enqueue(self, r: _Req, group: str) -> None:
        r.queued = True
        r.state = "waiting"
        q = self.fwdq[group]
        q.append(r)
        q.sort(key=lambda e: (e.deadline, e.idx))

    def _rank(self, r: _Req, group: str) -> int:
        return self.fwdq[group].index(r)

    def _leave_queue(self, r: _Req) -> None:
        if r.queued:
            q = self.fwdq[f"g{r.spec.group % self.cfg.groups}"]
            if r in q:
                q.remove(r)

    def _wake(self, group: str, freed: str) -> None:
        """A slot freed: the earliest-deadline request that is waiting retries, freed
        prefill first (the live gateway's targeted wake-up)."""
        for r in self.fwdq[group]:
            if r.state == "waiting":
                self.fillers[r.gateway].on_accept(group, freed)
                self._try_round(r, group, first=freed)
                return

    def _route_local(self, r: _Req, cand: Candidate) -> None:
        p = self._by_id[cand.instance_id]
        self.open_streams[r.gateway][p.pid] += 1
        r.state, r.prefill = "queued-local", p.pid

        def at_prefill() -> None:
            if r.state == "done":
                return
            if p.busy < self.cfg.slots and not p.fifo:
                self._start_prefill(r, p)
            else:
                p.fifo.append(r)

        self.at(self.now + self.cfg.rtt_ms / 2, at_prefill)

    def _start_prefill(self, r: _Req, p: _Prefill) -> bool:
        self._leave_queue(r)
        late = self.now + (self.lat.prefill_ms(r.spec.prompt_len) if self.cfg.predictive
                           else 0.0)
        if late >= r.deadline:  # early intervention before compute
            self._fail(r, p.pid)
            if self.policy.rejects:
                self._wake(p.group, p.pid)  # nothing was taken; let a waiter have it
            return False
        p.busy += 1
        self.max_busy_seen = max(self.max_busy_seen, p.busy)
        r.state, r.prefill = "prefill", p.pid
        if self.policy.rejects:
            self.fillers[r.gateway].on_accept(p.group, p.pid)
        done = self.now + self.lat.prefill_ms(r.spec.prompt_len)
        self.at(done, lambda: self._prefilled(r, p))
        return True

    def _prefilled(self, r: _Req, p: _Prefill) -> None:
        if r.state == "done" or self.now >= r.deadline:  # early intervention after compute
            self._fail(r, p.pid)
            self._release(p)
            return
        self._first[r.idx] = self.now + self.cfg.rtt_ms / 2 - r.arrival
        kv_ms = r.spec.prompt_len * self.cfg.kv_bytes_per_token / (self.cfg.kv_gbps * 1e6)
        self.at(self.now + kv_ms, lambda: self._handoff(r, p))

    def _handoff(self, r: _Req, p: _Prefill) -> None:
        self._release(p)
        if not self._lifetime_streams:
            self.open_streams[r.gateway][p.pid] -= 1
        group = p.group
        d = rank_decodes([Candidate(x, self.cfg.decode_slots) for x in self.decodes[group]],
                         self.decode_active, 0)[0].instance_id
        self.decode_active[d] += 1
        batch = self.decode_active[d]
        ctx = r.spec.prompt_len + r.spec.output_len // 2
        steps = max(0, r.spec.output_len - 1)
        # Each sequence of a round pays its share of the step (the mock engine's rule).
        dur = steps * self.lat.step_ms([ctx] * batch) / batch
        r.state = "decode"

        def finished() -> None:
            self.decode_active[d] -= 1
            if self._lifetime_streams:
                self.open_streams[r.gateway][p.pid] -= 1
            self._end(r, ok=True)

        self.at(self.now + dur, finished)

    def _release(self, p: _Prefill) -> None:
        p.busy -= 1
        self._free_slot_soon(p)

    def _free_slot_soon(self, p: _Prefill) -> None:
        if self.policy.rejects:
            self._wake(p.group, p.pid)
            return
        while p.fifo and p.busy < self.cfg.slots:
            nxt = p.fifo.popleft()
            if nxt.state != "done":
                self._start_prefill(nxt, p)

    def _deadline(self, r: _Req) -> None:
        if r.state in ("waiting", "queued-local", "trying", "new"):
            # Past its TTFT deadline before any prefill started it: DEADLINE_EXCEEDED.
            if r.state == "queued-local":
                # In a FIFO, or still on its way to one (``at_prefill`` drops it then).
                for p in self._by_id.values():
                    if r in p.fifo:
                        p.fifo.remove(r)
                self.open_streams[r.gateway][r.prefill] -= 1
            self._leave_queue(r)
            self._end(r, ok=False)

    def _fail(self, r: _Req, pid: str) -> None:
        self.open_streams[r.gateway][pid] -= 1
        self._end(r, ok=False)

    def _end(self, r: _Req, ok: bool) -> None:
        if r.state == "done":
            raise AssertionError(f"request {r.idx} ended twice")
        first = self._first.get(r.idx)
        self.results[r.idx] = Result(ok and first is not None,
                                     first if first is not None else float("nan"),
                                     r.slo_ms, self.now, r.queued)
        r.state = "done"
        self._leave_queue(r)
        if self._on_end is not None:
            self._on_end(r.idx)

