"""The simulator's decode side, its control hook and the queueing baselines, as mixins of
``core.Simulator``
(split off to keep each file readable; they share its state and event loop)."""

from __future__ import annotations

import heapq
from heapq import heappush

from bench.sim import hook
from bench.sim.decode import FluidDecode
from bench.sim.model import CANCELLED, DEADLINE, OK, REFUSED
from bench.sim.state import (
    DECODE,
    DONE,
    DWAIT,
    FETCH,
    LOCAL,
    NEW,
    TRYING,
    WAITING,
    Group,
    Prefill,
    Req,
)
from services.gateway import policy as pol
from services.gateway import scheduling as sched

# The classes below are mixins of ``core.Simulator``: they use its state and event loop
# and import nothing of core (core imports them), so the two files form no import cycle.


class DecodeSide:
    # -- decode ---------------------------------------------------------------------------
    def _to_decode(self, r: Req) -> None:
        g, gw = r.group, r.gw
        idx = g.idx_d[gw]
        tick = g.ticks[gw]
        g.ticks[gw] = tick + 1
        need = self._blocks(r)
        if self.cfg.decode_pool_tokens and need > self.cfg.decode_pool_tokens // \
                self.cfg.decode_block_tokens:
            self._end(r, REFUSED)  # can never fit a decode's pool: the live decode refuses
            if self.audit:
                self.audit.kv_free(self.now, r.idx, "store")
            if self.lifetime and r.pobj is not None:
                self._unstream(r, r.pobj)
            return
        for did in pol.pick_decodes(idx.ranked(tick), idx, self._dslots, _NO_FALLBACK):
            d = g.decodes[did]
            # The decode admits with a free slot and room in its KV pool; else it refuses.
            if d.B + d.reserved < d.slots and (d.pool_free < 0 or d.pool_free >= need):
                self._fetch(r, d)
                return
        r.state = DWAIT  # every decode is full: the KV waits in the kvstore
        g.dwait.append(r)

    def _blocks(self, r: Req) -> int:
        return -(-(r.n + r.out + 1) // self.cfg.decode_block_tokens)

    def _fetch(self, r: Req, d: FluidDecode) -> None:
        g = r.group
        d.reserved += 1
        if d.pool_free >= 0:
            d.pool_free -= self._blocks(r)
        g.idx_d[r.gw].add(d.iid, 1)
        r.dec = d
        r.state = FETCH
        if self.audit:
            self.audit.transfer(r.idx, "fetch", "start")
        hop = (r.n * self._kv_ms_per_token + self.cfg.kv_fixed_ms) if self.cfg.fetch else 0.0
        t = self.now + hop  # self.at, inlined
        heappush(self._heap, (t if t > self.now else self.now, next(self._seq), self._join, r))

    def _join(self, r: Req) -> None:
        d = r.dec
        assert d is not None
        d.reserved -= 1
        if r.state == DONE:  # cancelled during the fetch
            if d.pool_free >= 0:
                d.pool_free += self._blocks(r)
            if self.audit:
                self.audit.transfer(r.idx, "fetch", "abort")
                self.audit.kv_free(self.now, r.idx, "store")
            self._decode_slot_freed(d)
            return
        if self.audit:
            self.audit.transfer(r.idx, "fetch", "done")
            self.audit.kv_move(self.now, r.idx, "store", d.iid)
            self.audit.decode_start(self.now, r.idx, d.iid, r.group.name)
        r.state = DECODE
        r.t_dstart = self.now
        r.ctx0 = r.n + 1
        steps = max(0, r.out - 1)
        d.advance(self.now)
        r.vjoin = d.V
        d.join(self.now, r.ctx0, steps, r.idx, r)
        self._reschedule(d)

    def _reschedule(self, d: FluidDecode) -> None:
        d.version += 1
        t = d.next_finish_ms()
        if t is not None:  # self.at, inlined
            heappush(self._heap, (t if t > self.now else self.now, next(self._seq),
                                  self._decode_tick, (d, d.version)))

    def _decode_tick(self, arg: object) -> None:
        d, version = arg  # type: ignore[misc]
        if version != d.version:
            return
        d.advance(self.now)
        heap = d.heap
        done = []
        while heap and heap[0][0] <= d.V + 1e-6:
            _, _, r = heapq.heappop(heap)
            if not r.gone:
                done.append(r)
        for r in done:
            self._leave_decode(r, d)
            self._end(r, OK)
        self._reschedule(d)
        if done:
            self._decode_slot_freed(d)

    def _leave_decode(self, r: Req, d: FluidDecode) -> None:
        r.gone = True
        d.leave(self.now, r.ctx0, r.vjoin)
        if d.pool_free >= 0:
            d.pool_free += self._blocks(r)
        g = r.group
        g.darea += self.now - r.t_dstart
        if d.live:
            g.idx_d[r.gw].add(d.iid, -1)
        if self.lifetime and r.pobj is not None:
            self._unstream(r, r.pobj)
        if self.audit:
            self.audit.kv_free(self.now, r.idx, d.iid)

    def _decode_slot_freed(self, d: FluidDecode) -> None:
        g = d.group
        assert isinstance(g, Group)
        if d.drain is not None:
            self._maybe_switch(d)
            return
        while g.dwait and d.B + d.reserved < d.slots:
            r = g.dwait[0]
            if r.state != DWAIT:
                g.dwait.popleft()
                continue
            if 0 <= d.pool_free < self._blocks(r):
                break  # the head waits for room (the live gateway retries in order too)
            g.dwait.popleft()
            self._fetch(r, d)


class ControlSide:
    # -- control hook ---------------------------------------------------------------------
    def _control(self, _: object) -> None:
        assert self.control is not None
        period = self.cfg.control_period_ms
        snaps = []
        for g in self.groups.values():
            g.account(self.now)
            pa, sa, da = g.parea - g.p_parea, g.sarea - g.p_sarea, g.darea - g.p_darea
            n_ok = max(g.c_ok, 1)
            nd = sum(1 for d in g.decodes.values() if d.live)
            snaps.append(hook.GroupSnapshot(
                g.name, self.now, period, g.c_arrived, g.c_ok, g.c_failed, g.c_cancelled,
                g.c_slo, g.s_ttft / n_ok if g.c_ok else float("nan"),
                g.s_e2e / n_ok if g.c_ok else float("nan"),
                g.s_share / n_ok if g.c_ok else float("nan"),
                sum(1 for e in g.queue if e[3].state == WAITING), len(g.dwait),
                # Busy time is booked when a prefill starts (decode: when it ends), so a
                # period can show a little more than it held; clipped to 1.
                min(1.0, pa / (sa * self.cfg.slots)) if sa else 0.0,
                min(1.0, da / (period * max(nd, 1) * self.cfg.decode_slots)),
                tuple(i for i, p in g.prefills.items() if p.live),
                tuple(i for i, d in g.decodes.items() if d.live),
                tuple((i, *o.drain) for i, o in self.inst.items()
                      if o.drain is not None and o.group is g)))
            g.reset_period()
            g.p_parea, g.p_sarea, g.p_darea = g.parea, g.sarea, g.darea
        for a in self.control(snaps):
            self._reassign(a)
        if self._busy_any():
            self.at(self.now + period, self._control)

    def _reassign(self, a: hook.Reassign) -> None:
        o = self.inst.get(a.instance_id)
        if o is None or o.drain is not None:
            return  # unknown, or draining already: idempotent
        g = o.group
        assert isinstance(g, Group)
        to_group = a.group or g.name
        role = "prefill" if isinstance(o, Prefill) else "decode"
        if to_group not in {x.name for x in self.groups.values()}:
            raise ValueError(f"reassign {a.instance_id} to unknown group {to_group!r}")
        if a.role == role and to_group == g.name:
            return
        o.drain = (a.role, to_group)
        self.stats.moves += 1
        o.live = False  # out of routing now; in-flight work finishes
        g.account(self.now)
        g.reindex()
        if self.audit:
            self.audit.member(self.now, o.iid, g.name, role, False)
        self._maybe_switch(o)

    def _maybe_switch(self, o: Prefill | FluidDecode) -> None:
        idle = (o.busy == 0 and not o.fifo) if isinstance(o, Prefill) else \
            (o.B == 0 and o.reserved == 0)
        if idle and o.drain is not None:
            self.at(self.now + self.cfg.switch_ms, self._switch, o)

    def _switch(self, o: Prefill | FluidDecode) -> None:
        if self.inst.get(o.iid) is not o or o.drain is None:
            return
        role, to_group = o.drain
        g = o.group
        assert isinstance(g, Group)
        if isinstance(o, Prefill):
            del g.prefills[o.iid]
        else:
            del g.decodes[o.iid]
        g.account(self.now)
        g.reindex()
        dst = next(x for x in self.groups.values() if x.name == to_group)
        dst.account(self.now)
        (self._add_prefill if role == "prefill" else self._add_decode)(o.iid, dst)
        dst.reindex()
        if role == "prefill" and self.rejects:
            self._wake(dst, o.iid)
        elif role == "decode":
            self._decode_slot_freed(dst.decodes[o.iid])


class _Const(dict[str, int]):
    """Every decode has the same b_d: a mapping that answers it for any id."""

    def __init__(self, v: int) -> None:
        super().__init__()
        self.v = v

    def get(self, key: str, default: object = None) -> int:  # type: ignore[override]
        return self.v


_NO_FALLBACK: dict[str, float] = {}  # the simulated transports never fall back


class BaselineSide:
    """The queueing baselines (one prefill, its local FIFO) and the ends a deadline or a
    client cancel bring, whatever the request's state."""

    # -- queueing baselines ---------------------------------------------------------------
    def _route_local(self, r: Req) -> None:
        g, gw = r.group, r.gw
        tick = g.ticks[gw]
        g.ticks[gw] = tick + 1
        pid = next(sched.order_ids(self.policy, g.name, g.idx_p[gw], tick, g.fillers[gw],
                                   g.loads), None)
        if pid is None:
            self._end(r, REFUSED)
            return
        g.idx_p[gw].add(pid, 1)
        r.state = LOCAL
        r.pobj = g.prefills[pid]
        self.at(self.now + self.cfg.rtt_ms / 2, self._at_local, r)

    def _at_local(self, r: Req) -> None:
        p = r.pobj
        assert p is not None
        if r.state == DONE:
            self._unstream(r, p)
            return
        if not p.live:
            self._unstream(r, p)
            self._end(r, REFUSED)
        elif p.busy < self.cfg.slots and not p.fifo:
            self._start_prefill(r, p)
        else:
            p.fifo.append(r)
            self.at(r.deadline, self._deadline, r)

    def _deadline(self, r: Req) -> None:
        if r.state in (NEW, TRYING, WAITING, LOCAL):
            # Past its TTFT deadline before any prefill started it: DEADLINE_EXCEEDED.
            if r.state == LOCAL and r.pobj is not None:
                p = r.pobj
                if r in p.fifo:
                    p.fifo.remove(r)
                    self._unstream(r, p)
                    self._maybe_switch(p)  # a draining prefill may be idle now
            self._end(r, DEADLINE)

    def _cancel(self, r: Req) -> None:
        s = r.state
        if s == DONE:
            return
        if s in (NEW, TRYING, WAITING, LOCAL):
            if s == LOCAL and r.pobj is not None and r in r.pobj.fifo:
                r.pobj.fifo.remove(r)
                self._unstream(r, r.pobj)
                self._maybe_switch(r.pobj)  # a draining prefill may be idle now
            self._end(r, CANCELLED)
        elif s == DWAIT:
            r.group.dwait.remove(r)
            if self.audit:
                self.audit.kv_free(self.now, r.idx, "store")
            if self.lifetime and r.pobj is not None:
                self._unstream(r, r.pobj)
            self._end(r, CANCELLED)
        elif s == DECODE:
            d = r.dec
            assert d is not None
            self._leave_decode(r, d)
            self._end(r, CANCELLED)
            self._reschedule(d)
            self._decode_slot_freed(d)
        else:  # PREFILL, FETCH: the pending handoff/join event cleans up
            if s == FETCH and self.lifetime and r.pobj is not None:
                self._unstream(r, r.pobj)
            self._end(r, CANCELLED)
