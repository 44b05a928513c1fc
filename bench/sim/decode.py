"""A decode instance as a fluid batch: progress is computed per batch change, not per step.

The mock engine's round over a batch of B sequences with contexts ctx_i takes
``step = d0 + d1*(B-1) + d2*sum(ctx_i)`` and gives every member one token. Counting rounds
as a continuous V, each member's context is ``ctx0_i + (V - V_join_i)``, so
``step(V) = alpha + beta*V`` with ``alpha = d0 + d1*(B-1) + d2*sum(ctx0_i - V_join_i)`` and
``beta = d2*B``. Between two batch changes the time to go from V0 to V0 + dV is
``dV*(alpha + beta*V0) + beta*dV^2/2`` (exact for the integral, within one round of the
stepped engine), and its inverse is a quadratic's root. A member finishes when V reaches
``V_join + steps``: a heap per decode gives the next finisher, and only that one is an
event. A join or leave costs O(log B)."""

from __future__ import annotations

import heapq
import math

from services.engine.mock import LatencyModel


class FluidDecode:
    __slots__ = ("B", "V", "beta_unit", "busy_t", "d0", "d1", "drain", "group", "heap", "iid",
                 "live", "pool_free", "reserved", "scale", "slots", "sumbase", "tv", "version")

    def __init__(self, iid: str, group: object, slots: int, lat: LatencyModel,
                 scale: float) -> None:
        self.iid = iid
        self.group = group
        self.slots = slots
        self.live = True  # routable (not draining, not retired)
        self.drain: tuple[str, str] | None = None  # (to role, to group) once draining
        self.busy_t = 0.0
        self.d0, self.d1, self.beta_unit = lat.d0, lat.d1, lat.d2
        self.scale = scale
        self.B = 0
        self.V = 0.0
        self.tv = 0.0
        self.sumbase = 0.0
        self.heap: list[tuple[float, int, object]] = []
        self.reserved = 0  # slots promised to fetches in flight
        self.pool_free = -1  # free KV pool blocks; -1: no pool limit
        self.version = 0

    def _s0(self) -> float:
        return (self.d0 + self.d1 * (self.B - 1) + self.beta_unit * self.sumbase
                + self.beta_unit * self.B * self.V)

    def advance(self, now: float) -> None:
        B = self.B
        if B and now > self.tv:
            t = (now - self.tv) / self.scale
            bu = self.beta_unit
            s0 = self.d0 + self.d1 * (B - 1) + bu * self.sumbase + bu * B * self.V  # _s0()
            beta = bu * B
            if beta > 0.0:
                self.V += (math.sqrt(s0 * s0 + 2.0 * beta * t) - s0) / beta
            else:
                self.V += t / s0
        self.tv = now

    def join(self, now: float, ctx0: int, steps: int, seq: int, member: object) -> float:
        """Adds a member at ``now``; returns its target V."""
        self.advance(now)
        self.B += 1
        self.sumbase += ctx0 - self.V
        vf = self.V + steps
        heapq.heappush(self.heap, (vf, seq, member))
        return vf

    def leave(self, now: float, ctx0: int, v_join: float) -> None:
        self.advance(now)
        self.B -= 1
        self.sumbase -= ctx0 - v_join
        if not self.B:
            self.sumbase = 0.0  # no drift across idle periods

    def next_finish_ms(self) -> float | None:
        """Virtual time of the next member's finish, with the batch as it is now."""
        heap = self.heap
        while heap and getattr(heap[0][2], "gone", False):
            heapq.heappop(heap)  # cancelled members left already
        if not heap:
            return None
        dv = max(0.0, heap[0][0] - self.V)
        beta = self.beta_unit * self.B
        return self.tv + (dv * self._s0() + 0.5 * beta * dv * dv) * self.scale
