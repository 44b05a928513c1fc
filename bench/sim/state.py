"""The simulator's mutable state: a request in flight, a prefill instance, a scenario
group (its pools, each gateway's ``LoadIndex`` of them, its queues and counters)."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Iterator
from itertools import islice

from bench.sim.decode import FluidDecode
from bench.sim.model import SimRequest
from services.gateway import policy as pol
from services.gateway import scheduling as sched
from services.prefill import estimator as est

NEW, TRYING, WAITING, LOCAL, PREFILL, DWAIT, FETCH, DECODE, DONE = range(9)
HASH_BLOCK_TOKENS = 512  # a Mooncake hash id covers 512 tokens (bench/traces.py)


def lru_touch(cache: dict[int, None], ids: Iterable[int], cap: int) -> int:
    """A prefill's prefix-cache LRU: touch ``ids`` in order and return how many leading
    ids were cached. One pass: the leading hits move to the LRU's end, then every id from
    the first miss on is (re)inserted at the end; the same order as "count the leading
    hits, then touch every id", since touching an id never changes whether another is
    cached. A plain dict keeps insertion order: delete and re-insert moves a key to the
    end, and the least recently used are its first keys (faster than an OrderedDict)."""
    hit = 0
    it = iter(ids)
    for h in it:
        if h in cache:
            hit += 1
            del cache[h]
            cache[h] = None
        else:
            cache[h] = None
            break
    pop = cache.pop
    for h in it:
        pop(h, None)
        cache[h] = None
    excess = len(cache) - cap
    if excess > 0:
        for h in list(islice(cache, excess)):
            del cache[h]
    return hit


class Req:
    __slots__ = ("arrival", "asked", "cached", "cancel_at", "ctx0", "deadline", "dec", "gi",
                 "gone", "group", "gw", "hash_ids", "idx", "it", "n", "offer", "offered", "out",
                 "pobj", "qkey", "queued", "slo", "state", "t_done", "t_dstart", "t_first",
                 "t_pstart", "vjoin")

    def __init__(self, idx: int, spec: SimRequest, group: Group, gw: int, now: float,
                 slo: float) -> None:
        self.idx, self.group, self.gw = idx, group, gw
        self.n, self.out, self.hash_ids = spec.prompt_len, spec.output_len, spec.hash_ids
        self.arrival, self.slo, self.deadline = now, slo, now + slo
        self.state, self.queued, self.gone = NEW, False, False
        self.asked: set[str] = set()
        self.it: Iterator[str] | None = None
        self.pobj: Prefill | None = None
        self.dec: FluidDecode | None = None
        self.qkey: tuple[float, str, int] | None = None
        self.offer: str | None = None  # a freed prefill offered to it, not yet used
        self.offered: dict[str, float] = {}  # offer mark: request id -> until (ms)
        self.cached = 0
        self.cancel_at = -1.0
        self.t_pstart = self.t_first = self.t_done = self.t_dstart = float("nan")
        self.ctx0, self.vjoin = 0, 0.0


class Prefill:
    __slots__ = ("busy", "cache", "drain", "estimator", "fifo", "group", "iid", "live")

    def __init__(self, iid: str, group: Group) -> None:
        self.iid, self.group = iid, group
        self.busy = 0
        self.fifo: deque[Req] = deque()
        self.estimator = est.PrefillEstimator()
        self.cache: dict[int, None] = {}  # prefix-cache LRU, least recent first
        self.live = True
        self.drain: tuple[str, str] | None = None


class Group:
    """One scenario group: its pools, each gateway's view of them, its queues, counters."""

    def __init__(self, gi: int, name: str, gateways: int) -> None:
        self.gi, self.name = gi, name
        self.prefills: dict[str, Prefill] = {}
        self.decodes: dict[str, FluidDecode] = {}
        self.idx_p = [pol.LoadIndex() for _ in range(gateways)]
        self.idx_d = [pol.LoadIndex() for _ in range(gateways)]
        self.fillers = [sched.BatchFiller() for _ in range(gateways)]
        self.ticks = [0] * gateways
        self.queue: list[tuple[float, str, int, Req]] = []  # sorted by queue_key
        self.free: deque[tuple[str, float]] = deque()  # slots freed with no one waiting
        self.poll_armed = False
        self.dwait: deque[Req] = deque()
        self.loads: dict[str, sched.Load] = {}
        self.rng = random.Random(gi)
        self.n_req = 0
        self.pt = 0.0
        self.parea = 0.0
        self.sarea = 0.0
        self.pslots = 0
        self.darea = 0.0
        self.reset_period()

    def reset_period(self) -> None:
        self.c_arrived = self.c_ok = self.c_failed = self.c_cancelled = self.c_slo = 0
        self.s_ttft = self.s_e2e = self.s_share = 0.0
        self.p_parea = self.p_sarea = self.p_darea = 0.0

    def account(self, now: float) -> None:
        """Integrates the slots the group has (they change only when a role switches).
        Busy slot-time is added per request instead (``parea``, ``darea``)."""
        dt = now - self.pt
        if dt > 0:
            self.sarea += self.pslots * dt
            self.pt = now

    def reindex(self) -> None:
        for idx in self.idx_p:
            idx.reset([i for i, p in self.prefills.items() if p.live], idx)
        for idx in self.idx_d:
            idx.reset([i for i, d in self.decodes.items() if d.live], idx)
        self.pslots = sum(1 for p in self.prefills.values() if p.live)
