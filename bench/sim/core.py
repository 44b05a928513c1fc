"""The fleet simulator: a request-level discrete-event simulation of pdserve scenario
groups that drives the live gateway's policy code under a virtual clock.

One policy core, two clocks. Decisions call the very function objects the live gateway
calls, looked up on their modules at call time (so a patched policy changes both):
``scheduling.order_ids`` (forward's batch filling and least-open-streams order, and the
queueing baselines), ``policy.LoadIndex`` (the ranking structure), ``scheduling.queue_key``
(the forwarding queue's earliest-deadline order), ``scheduling.may_offer`` (whom a freed
slot is offered to: the rule the live queue's Redis OFFER script runs),
``policy.pick_decodes`` (decode selection, transport health included) and the prefill's
own ``PrefillEstimator`` (predictive early intervention). Only I/O and time are replaced:
an RPC is ``rtt_ms / 2``, compute is the mock engine's ``LatencyModel``, a KV hop is
``bytes / kv_gbps``. ``POLICY_CORE`` lists those objects; a test checks they are the
live gateway's.

Per decision cost does not grow with the fleet: each gateway keeps a ``LoadIndex`` per
group and role (open streams, bucketed), the forwarding queue is a sorted list keyed by
``queue_key`` (O(log n) rank), decode progress is a ``FluidDecode`` (one event per batch
change). Groups never share an instance or a request unless a controller moves one, so
``bench.sim.fleet`` runs groups in parallel processes.

Request life (forward): arrive -> (a non-empty queue: join it and wait for an offer) -> TRY
prefills in ``order_ids`` order, each answer after a round trip -> accepted: compute,
deadline checked before (and by prediction) and after, first token half a round trip
later, slot held until the KV push ends -> decode chosen by ``pick_decodes`` (a full
group waits for a slot) -> KV fetch -> fluid batch -> end. All rejected: the group's
queue; a freed slot is offered to the earliest-deadline entry without an offer, which
asks that prefill first; a slot nobody takes is remembered ``FREE_TTL_MS`` for a
newcomer. Queueing baselines: one prefill, its FIFO.

The control hook (``bench.sim.hook``): every ``control_period_ms`` the callback gets a
``GroupSnapshot`` per group and returns ``Reassign``s, applied with drain semantics.

``audit=True`` records what the invariant tests check (``tests/unit/test_sim_invariants.py``):
a KV ledger (transfers started = completed + aborted, one owner per request's blocks),
the clock, each request's timestamps, and pool membership over time.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import random
from bisect import bisect_left, insort
from collections.abc import Callable, Iterator, Sequence
from heapq import heappush

from bench.sim import hook
from bench.sim.decode import FluidDecode
from bench.sim.ledger import Audit
from bench.sim.model import (
    CANCELLED,
    DEADLINE,
    LOP_QUEUE,
    OK,
    Result,
    SimConfig,
    SimRequest,
    Stats,
    _bin,
)
from bench.sim.sides import BaselineSide, ControlSide, DecodeSide, _Const
from bench.sim.state import (
    DONE,
    HASH_BLOCK_TOKENS,
    PREFILL,
    TRYING,
    WAITING,
    Group,
    Prefill,
    Req,
    lru_touch,
)
from services.cluster import slotoffer
from services.engine.mock import LatencyModel
from services.gateway import scheduling as sched

SIM_POLICIES = [p.value for p in sched.Policy] + [LOP_QUEUE]
# The live functions the simulator drives (looked up on the modules at call time).
POLICY_CORE = ("scheduling.order_ids", "scheduling.queue_key", "scheduling.may_offer",
               "policy.LoadIndex", "policy.pick_decodes", "estimator.PrefillEstimator")

class Simulator(DecodeSide, ControlSide, BaselineSide):
    def __init__(self, cfg: SimConfig, latency: LatencyModel,
                 group_ids: Sequence[int] | None = None,
                 control: hook.Control | None = None, keep_results: bool = True,
                 audit: bool = False) -> None:
        if cfg.policy != LOP_QUEUE and cfg.policy not in {p.value for p in sched.Policy}:
            raise ValueError(f"unknown policy {cfg.policy!r}; one of {SIM_POLICIES}")
        self.cfg = cfg
        self.lat = latency
        self.policy = sched.Policy.LOS_QUEUE if cfg.policy == LOP_QUEUE else \
            sched.Policy(cfg.policy)
        self.rejects = self.policy.rejects
        self.lifetime = cfg.policy != LOP_QUEUE and self.policy.lifetime_streams
        self.control = control
        self.keep = keep_results
        self.audit = Audit() if audit else None
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], object]] = []
        self._seq = itertools.count()
        self.stats = Stats()
        self.results: dict[int, Result] = {}
        self.groups: dict[int, Group] = {}
        self.inst: dict[str, Prefill | FluidDecode] = {}
        self.max_busy_seen = 0
        self.inflight = 0
        self.sources_left = 0
        self._on_end: Callable[[int], None] | None = None
        self._window: tuple[float, float] | None = None
        self._kv_ms_per_token = cfg.kv_bytes_per_token / (cfg.kv_gbps * 1e6)
        self._half_rtt = cfg.rtt_ms / 2
        self._dslots = _Const(cfg.decode_slots)  # every decode has the same b_d
        self._cache_cap = max(1, cfg.prefix_cache_blocks * 64 // HASH_BLOCK_TOKENS)
        for gi in (range(cfg.groups) if group_ids is None else group_ids):
            g = Group(gi, f"g{gi}", cfg.gateways)
            g.rng = random.Random(f"{cfg.seed}/{gi}")  # per group: sharding changes nothing
            self.groups[gi] = g
            for i in range(cfg.prefills_per_group):
                self._add_prefill(f"g{gi}-p{i}", g)
            for i in range(cfg.decodes_per_group):
                self._add_decode(f"g{gi}-d{i}", g)
            g.reindex()

    # -- pools ------------------------------------------------------------------------------
    def _add_prefill(self, iid: str, g: Group) -> None:
        p = Prefill(iid, g)
        g.prefills[iid] = p
        self.inst[iid] = p
        if self.audit:
            self.audit.member(self.now, iid, g.name, "prefill", True)

    def _add_decode(self, iid: str, g: Group) -> None:
        d = FluidDecode(iid, g, self.cfg.decode_slots, self.lat, self.cfg.time_scale)
        d.tv = self.now
        if self.cfg.decode_pool_tokens:
            d.pool_free = self.cfg.decode_pool_tokens // self.cfg.decode_block_tokens
        g.decodes[iid] = d
        self.inst[iid] = d
        if self.audit:
            self.audit.member(self.now, iid, g.name, "decode", True)

    @property
    def prefills(self) -> dict[str, list[Prefill]]:
        return {g.name: list(g.prefills.values()) for g in self.groups.values()}

    @property
    def fwdq(self) -> dict[str, list[tuple[float, str, int, Req]]]:
        return {g.name: g.queue for g in self.groups.values()}

    @property
    def open_streams(self) -> list[dict[str, int]]:
        out: list[dict[str, int]] = [{} for _ in range(self.cfg.gateways)]
        for g in self.groups.values():
            for k in range(self.cfg.gateways):
                out[k].update(g.idx_p[k])
                out[k].update(g.idx_d[k])
        return out

    # -- event loop -------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], arg: object = None) -> None:
        heapq.heappush(self._heap, (t if t > self.now else self.now, next(self._seq), fn, arg))

    def run(self, requests: Sequence[SimRequest], closed_users: int = 0) -> list[Result]:
        """Open loop: each request arrives at its ``arrival_ms``. Closed loop
        (``closed_users`` > 0): that many users, each sending the next request of the
        sequence when its last one ended. Returns one ``Result`` per request, in order."""
        reqs = list(requests)
        if closed_users > 0:
            pending = iter(range(len(reqs)))

            def next_for_user(_: int) -> None:
                i = next(pending, None)
                if i is not None:
                    self.sources_left += 1
                    self.at(self.now, self._arrive_one, (i, reqs[i]))

            self._on_end = next_for_user
            for _ in range(min(closed_users, len(reqs))):
                next_for_user(-1)
        else:
            by_group: dict[int, list[tuple[int, SimRequest]]] = {}
            for i, r in enumerate(reqs):
                by_group.setdefault(r.group % self.cfg.groups, []).append((i, r))
            for items in by_group.values():
                items.sort(key=lambda x: (x[1].arrival_ms, x[0]))
                self.add_source(iter(items))
        self.loop()
        return [self.results[i] for i in range(len(reqs))]

    def add_source(self, items: Iterator[tuple[int, SimRequest]]) -> None:
        """A time-ordered stream of (index, request) for one group; read one at a time."""
        first = next(items, None)
        if first is not None:
            self.sources_left += 1
            self.at(first[1].arrival_ms, self._arrive_stream, (first, items))

    def loop(self) -> None:
        if self.policy is sched.Policy.REPORTED_QUEUE:
            self.at(self.now, self._report)
        if self.control is not None and self.cfg.control_period_ms > 0:
            self.at(self.now + self.cfg.control_period_ms, self._control)
        heap, pop = self._heap, heapq.heappop
        audit = self.audit
        events = 0
        # The loop makes no reference cycles (a request, its events and its stats are freed
        # by reference counting; tests/unit/test_sim_invariants.py checks it), so the cyclic
        # collector only spends time here: 13% of a fleet run, walking live heap entries
        # and requests. It is off while the loop runs, unless a control callback (code
        # outside the simulator) runs inside it.
        gc_paused = self.control is None and gc.isenabled()
        if gc_paused:
            gc.disable()
        try:
            while heap:
                t, _, fn, arg = pop(heap)
                if audit is not None:
                    audit.clock(t, self.now)
                self.now = t
                fn(arg)
                events += 1
        finally:
            if gc_paused:
                gc.enable()
        self.stats.events += events
        for g in self.groups.values():
            g.account(self.now)
        busy, slot_ms = self._window or (sum(g.parea for g in self.groups.values()),
                                         sum(g.sarea for g in self.groups.values())
                                         * self.cfg.slots)
        self.stats.prefill_busy_ms += busy
        self.stats.prefill_slot_ms += slot_ms
        self.stats.sim_ms = max(self.stats.sim_ms, self.now)

    def window(self, t: float) -> None:
        """Measure prefill utilisation over [0, t] only (the arrival window, not the
        drain after the last arrival)."""
        self.at(t, self._close_window)

    def _close_window(self, _: object) -> None:
        self.stats.events -= 1  # bookkeeping, not a simulated event
        for g in self.groups.values():
            g.account(self.now)
        self._window = (sum(g.parea for g in self.groups.values()),
                        sum(g.sarea for g in self.groups.values()) * self.cfg.slots)

    def _busy_any(self) -> bool:
        return self.inflight > 0 or self.sources_left > 0

    def _report(self, _: object) -> None:
        for g in self.groups.values():
            g.loads = {p.iid: sched.Load(float(p.busy), float(len(p.fifo)), float(self.cfg.slots))
                       for p in g.prefills.values()}
        if self._busy_any():
            self.at(self.now + self.cfg.report_ms, self._report)

    # -- arrival ----------------------------------------------------------------------------
    def _arrive_stream(self, arg: object) -> None:
        (i, spec), items = arg  # type: ignore[misc]
        nxt = next(items, None)
        if nxt is not None:  # self.at, inlined on the hot paths (once per event)
            t = nxt[1].arrival_ms
            heappush(self._heap, (t if t > self.now else self.now, next(self._seq),
                                  self._arrive_stream, (nxt, items)))
        else:
            self.sources_left -= 1
        self._arrive(i, spec)

    def _arrive_one(self, arg: object) -> None:
        i, spec = arg  # type: ignore[misc]
        self.sources_left -= 1
        self._arrive(i, spec)

    def _arrive(self, i: int, spec: SimRequest) -> None:
        cfg = self.cfg
        g = self.groups[spec.group % cfg.groups]
        slo = cfg.slo_ms(self.lat.prefill_ms(spec.prompt_len) * cfg.time_scale)
        r = Req(i, spec, g, g.n_req % cfg.gateways, self.now, slo)
        g.n_req += 1
        g.c_arrived += 1
        self.inflight += 1
        rng = g.rng
        if cfg.cancel_frac > 0 and rng.random() < cfg.cancel_frac:
            r.cancel_at = self.now + rng.uniform(0.0, 2.0 * slo + 50.0 * spec.output_len)
            self.at(r.cancel_at, self._cancel, r)
        if self.audit:
            self.audit.arrive(self.now, r.idx)
        if cfg.gateway_ms > 0:
            self.at(self.now + cfg.gateway_ms, self._route, r)
        else:
            self._route(r)

    def _route(self, r: Req) -> None:
        if r.state == DONE:
            return
        if not self.rejects:
            self._route_local(r)
            return
        g = r.group
        if g.queue:  # others wait already: join, keep the group earliest-deadline-first
            self._enqueue(r)
            # ``probe_on_enter``'s rule, lazily: everyone ahead holds an offer (being
            # admitted, about to leave), so probe the prefills at once.
            if r.offer is None and not any(
                    sched.may_offer(sched.Waiting(rid, str(o.gw), o.deadline), o.offered,
                                    self.now)
                    for _, rid, _, o in itertools.takewhile(lambda e: e[3] is not r, g.queue)):
                self._try_round(r)
                return
            self._wait_or_retry(r)
            return
        self._try_round(r)

    # -- forward: TRY round, queue, wake-up -----------------------------------------------
    def _try_round(self, r: Req) -> None:
        g, gw = r.group, r.gw
        r.state = TRYING
        r.asked = set()
        tick = g.ticks[gw]
        g.ticks[gw] = tick + 1
        r.it = sched.order_ids(self.policy, g.name, g.idx_p[gw], tick, g.fillers[gw])
        self._ask_next(r)

    def _ask_next(self, r: Req, delay: float = 0.0) -> None:
        g = r.group
        idx = g.idx_p[r.gw]
        assert r.it is not None
        for pid in r.it:
            if pid in r.asked or pid not in idx:
                continue  # the index changed since the round began
            r.asked.add(pid)
            idx.add(pid, 1)
            heappush(self._heap, (self.now + delay + self._half_rtt, next(self._seq),
                                  self._at_prefill, (r, g.prefills[pid])))
            return
        if not r.queued:  # every prefill rejected: wait in the group's queue
            self._enqueue(r)
        self._wait_or_retry(r)

    def _wait_or_retry(self, r: Req) -> None:
        """Wait for an offer, or use one that came (or a slot that freed just before it
        queued) at once: ask that prefill first."""
        r.state = WAITING
        r.offered.clear()  # the offer mark is cleared before waiting again
        if r.offer is not None:
            freed, r.offer = r.offer, None
            r.group.fillers[r.gw].on_accept(r.group.name, freed)
            self._try_round(r)

    def _at_prefill(self, arg: object) -> None:
        r, p = arg  # type: ignore[misc]
        if r.state == DONE:
            self._unstream(r, p)
            return
        if self.now >= r.deadline:  # the prefill's "before" check
            self._unstream(r, p)
            self._end(r, DEADLINE)
            return
        if not p.live or p.busy >= self.cfg.slots:
            # REJECTED. Its way back and the next TRY's way out are one event: the gateway
            # books the rejection (stream closed, batch filler told) and asks the next
            # prefill, which sees the TRY a whole round trip from now.
            self._unstream(r, p)
            r.group.fillers[r.gw].on_reject(r.group.name, p.iid)
            self._ask_next(r, self.cfg.rtt_ms)
            return
        self._start_prefill(r, p)

    def _unstream(self, r: Req, p: Prefill) -> None:
        if p.live:
            r.group.idx_p[r.gw].add(p.iid, -1)

    def _enqueue(self, r: Req) -> None:
        g = r.group
        r.queued = True
        w = sched.Waiting(str(r.idx), str(r.gw), r.deadline)
        k = sched.queue_key(w)
        r.qkey = (k[0], k[1], r.idx)
        insort(g.queue, (*r.qkey, r))
        self.at(r.deadline, self._deadline, r)
        if not g.poll_armed and self.cfg.queue_poll_ms > 0:
            g.poll_armed = True
            self.at(self.now + self.cfg.queue_poll_ms, self._poll, g)
        # ENTER claims a slot that freed, unoffered, within FREE_TTL_MS.
        while g.free and g.free[0][1] < self.now - slotoffer.FREE_TTL_MS:
            g.free.popleft()
        if g.free:
            r.offer = g.free.popleft()[0]

    def _rank(self, r: Req) -> int | None:
        if r.qkey is None:
            return None
        q = r.group.queue
        i = bisect_left(q, r.qkey)
        return i if i < len(q) and q[i][3] is r else None

    def _leave_queue(self, r: Req) -> None:
        if r.qkey is not None:
            q = r.group.queue
            i = bisect_left(q, r.qkey)
            if i < len(q) and q[i][3] is r:
                del q[i]
            r.qkey = None

    def _wake(self, g: Group, freed: str) -> None:
        """A slot freed: it is offered to the earliest-deadline entry that may take an
        offer (``may_offer``, in ``queue_key`` order: ``offer_to``'s rule), which asks
        the freed prefill first once the offer reaches its gateway (``offer_ms``)."""
        now = self.now
        for _, rid, _, r in g.queue:
            w = sched.Waiting(rid, str(r.gw), r.deadline)
            if sched.may_offer(w, r.offered, now):
                r.offered[rid] = now + slotoffer.OFFER_TTL_MS
                self.at(now + self.cfg.offer_ms, self._offered, (r, freed))
                return
        g.free.append((freed, now))

    def _offered(self, arg: object) -> None:
        r, freed = arg  # type: ignore[misc]
        if r.state not in (TRYING, WAITING):
            # It left the queue (admitted, ended) after the offer was made: its gateway
            # passes the offer on at once (the waiter is gone), not when the request ends.
            self._wake(r.group, freed)
            return
        r.offer = freed
        if r.state == WAITING:
            self._wait_or_retry(r)

    # -- prefill ------------------------------------------------------------------------
    def _pass_on(self, r: Req) -> None:
        """An offer the request no longer needs (admitted elsewhere, ended) goes to the
        next waiter, as the live gateway passes unused offers on."""
        if r.offer is not None:
            freed, r.offer = r.offer, None
            self._wake(r.group, freed)

    def _poll(self, g: Group) -> None:
        """The gateways' safety-net poll: the head of a non-empty queue retries without an
        offer (``may_retry(rank, 1)``); it recovers a slot no offer reached."""
        g.poll_armed = False
        if not g.queue:
            return
        r = g.queue[0][3]
        if r.state == WAITING and sched.may_retry(0, 1):
            self._try_round(r)
        g.poll_armed = True
        self.at(self.now + self.cfg.queue_poll_ms, self._poll, g)

    def _start_prefill(self, r: Req, p: Prefill) -> None:
        self._leave_queue(r)
        if r.offer is not None and r.offer != p.iid:
            self._pass_on(r)
        r.offer = None
        g = p.group
        cfg = self.cfg
        r.pobj = p
        if self.now >= r.deadline:
            self._unstream(r, p)
            self._end(r, DEADLINE)
            self._slot_freed(p)
            return
        if cfg.predictive and p.estimator.lower_bound_ms(r.n) > r.deadline - self.now:
            self._unstream(r, p)  # early intervention by prediction: nothing was taken
            self._end(r, DEADLINE)
            self._slot_freed(p)
            return
        p.busy += 1
        if p.busy > self.max_busy_seen:
            self.max_busy_seen = p.busy
        r.state = PREFILL
        r.t_pstart = self.now
        if self.rejects:
            g.fillers[r.gw].on_accept(g.name, p.iid)
        cached = self._cached(p, r) if cfg.prefix_cache and r.hash_ids else 0
        r.cached = cached
        compute = self.lat.prefill_ms(r.n, cached) * cfg.time_scale
        r.t_done = self.now + compute
        if self.audit:
            self.audit.kv_reserve(self.now, r.idx, p.iid)
        if r.t_done >= r.deadline:  # the "after" check fails: release at the end of compute
            g.parea += compute
            self.at(r.t_done, self._prefill_failed, r)
            return
        r.t_first = r.t_done + cfg.rtt_ms / 2
        push = (r.n * self._kv_ms_per_token + cfg.kv_fixed_ms)
        g.parea += compute + push  # the slot is held until the KV push ends
        t = r.t_done + push
        heappush(self._heap, (t if t > self.now else self.now, next(self._seq), self._handoff,
                              r))

    def _cached(self, p: Prefill, r: Req) -> int:
        hit = lru_touch(p.cache, r.hash_ids, self._cache_cap)
        return min(hit * HASH_BLOCK_TOKENS, (r.n - 1) // 64 * 64)

    def _prefill_failed(self, r: Req) -> None:
        p = r.pobj
        assert p is not None
        p.estimator.observe(r.n, r.t_done - r.t_pstart)
        if self.audit:
            self.audit.kv_free(self.now, r.idx, p.iid)
        self._release(p)
        self._unstream(r, p)
        if r.state != DONE:
            self._end(r, DEADLINE)

    def _handoff(self, r: Req) -> None:
        """The KV push ended: the prefill's slot frees; the request goes to a decode."""
        p = r.pobj
        assert p is not None
        p.estimator.observe(r.n, r.t_done - r.t_pstart)
        self._release(p)
        if not self.lifetime:
            self._unstream(r, p)
        audit = self.audit
        if r.state == DONE:  # cancelled while computing or pushing
            if audit:
                if r.cancel_at >= r.t_done:
                    audit.transfer(r.idx, "push", "start")
                    audit.transfer(r.idx, "push", "abort")
                audit.kv_free(self.now, r.idx, "store")
            if self.lifetime:
                self._unstream(r, p)
            return
        if audit:
            audit.transfer(r.idx, "push", "start")
            audit.transfer(r.idx, "push", "done")
            audit.first_token(r.t_first, r.idx, p.iid, r.group.name, r.t_pstart, r.t_done)
        self._to_decode(r)

    def _release(self, p: Prefill) -> None:
        p.busy -= 1
        self._slot_freed(p)

    def _slot_freed(self, p: Prefill) -> None:
        if self.rejects and p.drain is None:
            self._wake(p.group, p.iid)
            return
        # A queueing prefill serves its local FIFO, also while it drains: the FIFO is
        # in-flight work that finishes before the switch (hook.py's drain semantics).
        while p.fifo and p.busy < self.cfg.slots:
            nxt = p.fifo.popleft()
            if nxt.state != DONE:
                self._start_prefill(nxt, p)
        if p.drain is not None:
            self._maybe_switch(p)

    # -- ends -----------------------------------------------------------------------------
    def _end(self, r: Req, status: str) -> None:
        if r.state == DONE:
            raise AssertionError(f"request {r.idx} ended twice")
        was = r.state
        r.state = DONE
        self._leave_queue(r)
        self._pass_on(r)
        self.inflight -= 1
        now = self.now
        ok = status == OK
        # The last token reaches the client half a round trip after the decode made it; a
        # one-token answer ends with its first token.
        end = max(now + self.cfg.rtt_ms / 2, r.t_first) if ok else now
        ttft = r.t_first - r.arrival if ok else float("nan")
        e2e = end - r.arrival
        st = self.stats
        st.requests += 1
        g = r.group
        if ok:
            st.ok += 1
            met = ttft <= r.slo
            st.slo_met += met
            g.c_ok += 1
            g.c_slo += met
            g.s_ttft += ttft
            g.s_e2e += e2e
            g.s_share += ttft / e2e if e2e > 0 else 1.0
            st.ttft_sum += ttft
            st.e2e_sum += e2e
            st.ttft_hist[_bin(ttft)] += 1
            st.e2e_hist[_bin(e2e)] += 1
        elif status == CANCELLED:
            st.cancelled += 1
            g.c_cancelled += 1
        elif status == DEADLINE:
            st.deadline += 1
            g.c_failed += 1
        else:
            st.refused += 1
            g.c_failed += 1
        st.queued += r.queued
        if self.audit:
            self.audit.end(end, r.idx, status, was)
        if self.keep:
            self.results[r.idx] = Result(
                ok, ttft, r.slo, end, r.queued, status, r.arrival, e2e if ok else float("nan"),
                r.pobj.iid if r.pobj is not None else "", r.dec.iid if r.dec is not None else "",
                r.t_pstart, r.t_first if ok else float("nan"), r.t_dstart, r.cached)
        if self._on_end is not None:
            self._on_end(r.idx)
