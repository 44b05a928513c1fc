"""Shared by the control-plane benches (ratio_sweep, ratio_shift, hot_groups): workloads,
goodput at the TTFT/E2E SLO, Eq. 1 predictions, and the adapter that runs
``services.control``'s pure ratio controller inside the simulator's control hook.

Workloads (per group):
- ``code``: the shipped Azure code trace (long prompts, short answers).
- ``chat``: a decode-heavy chat mix, ShareGPT-like lengths (synthetic, seeded):
  prompt ~ lognormal(median 800, sigma 0.6), answer ~ lognormal(median 200, sigma 0.6).
- ``chat-long``: the same prompts with answers twice as long (the §1.3 "Td+" shift).
- ``mooncake``: the shipped Mooncake trace (long prompts, shared prefixes by hash id).

Goodput: requests per second that met both SLOs, counted over the middle 80% of the
run's completions (no warm-up, no drain tail):
  TTFT <= slo_factor * prefill_ms(prompt) + slo_floor_ms      (the scheduling benches' rule)
  E2E  <= TTFT SLO + output_len * tpot_slo_ms
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.sim import hook
from bench.sim.model import Result, SimRequest
from bench.traces import AZURE_CODE, MOONCAKE, load_trace
from services.control.actuator import Kind
from services.control.controller import (
    ControllerConfig,
    FleetView,
    GroupView,
    Member,
    Obs,
    RatioController,
)
from services.control.perfmodel import Deployment, GroupProfile, Workload, from_latency
from services.engine.mock import LatencyModel

WORKLOADS = ("code", "chat", "chat-long", "mooncake")
MAX_PROMPT = 16384


@dataclass(frozen=True)
class Item:
    prompt_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


def workload(name: str, n: int, seed: int = 0) -> list[Item]:
    """``n`` requests of a named workload; ``seed`` picks the sample (a trace window)."""
    if name in ("chat", "chat-long"):
        rng = random.Random(f"chat/{seed}")
        k = 2 if name == "chat-long" else 1
        out = []
        for _ in range(n):
            p = min(MAX_PROMPT, max(16, int(rng.lognormvariate(math.log(800), 0.6))))
            o = max(2, int(rng.lognormvariate(math.log(200), 0.6)))
            out.append(Item(p, o * k))
        return out
    if name in ("code", "mooncake"):
        tr = load_trace(str(AZURE_CODE if name == "code" else MOONCAKE))
        start = (seed * 997) % max(1, len(tr) - n) if len(tr) > n else 0
        win = (tr[start:] + tr[:start])[:n] if len(tr) >= n else (tr * (n // len(tr) + 1))[:n]
        return [Item(min(r.prompt_len, MAX_PROMPT), max(1, r.output_len), r.hash_ids)
                for r in win]
    raise ValueError(f"unknown workload {name!r}; one of {WORKLOADS}")


def sim_requests(items: Sequence[Item], group: int = 0, t0_ms: float = 0.0,
                 rate_rps: float = 0.0, seed: int = 0) -> list[SimRequest]:
    """Closed loop when ``rate_rps`` is 0 (arrival times unused); else Poisson arrivals."""
    rng = random.Random(f"arrivals/{seed}/{group}")
    t, out = t0_ms, []
    for it in items:
        if rate_rps > 0:
            t += rng.expovariate(rate_rps) * 1000.0
        out.append(SimRequest(t, it.prompt_len, it.output_len, group, it.hash_ids))
    return out


@dataclass
class Point:
    workload: str
    run: int
    n_p: int
    n_d: int
    goodput_rps: float
    slo_share: float
    predicted_capacity: float


@dataclass
class Summary:
    workload: str
    run: int
    best: str
    worst: str
    best_over_worst: float
    best_over_worst_2: float  # among splits with >= 2 of each role (the controller's range)
    predicted: str
    predicted_rank: int  # 0: the measured best; 1: next best...
    predicted_adjacent: bool  # predicted split is the measured best or next to it
    predicted_goodput_share: float  # predicted split's goodput / best goodput
    users: int  # live closed loop (0 in the simulator: open-loop bisection)
    b_d: int
    predicted_u: str = ""  # Eq. 1 with the prefill utilisation target u_p
    u_p: float = 1.0
    predicted_u_adjacent: bool = False


def summarise(name: str, run: int, points: list[Point], pred_n_p: int, users: int,
              b_d: int, pred_u_n_p: int = 0, u_p: float = 1.0) -> Summary:
    ranked = sorted(points, key=lambda p: -p.goodput_rps)
    best, worst = ranked[0], ranked[-1]
    two = [p for p in ranked if p.n_p >= 2 and p.n_d >= 2]
    by_np = {p.n_p: p for p in points}
    rank = [p.n_p for p in ranked].index(pred_n_p)
    adjacent = abs(pred_n_p - best.n_p) <= 1
    return Summary(name, run, f"P{best.n_p}/D{best.n_d}", f"P{worst.n_p}/D{worst.n_d}",
                   best.goodput_rps / max(worst.goodput_rps, 1e-9),
                   two[0].goodput_rps / max(two[-1].goodput_rps, 1e-9) if two else 0.0,
                   f"P{pred_n_p}/D{by_np[pred_n_p].n_d}", rank, adjacent,
                   by_np[pred_n_p].goodput_rps / max(best.goodput_rps, 1e-9), users, b_d,
                   f"P{pred_u_n_p}/D{by_np[pred_u_n_p].n_d}" if pred_u_n_p else "", u_p,
                   bool(pred_u_n_p) and abs(pred_u_n_p - best.n_p) <= 1)


@dataclass(frozen=True)
class Slo:
    factor: float = 8.0
    floor_ms: float = 300.0
    tpot_ms: float = 60.0

    def met(self, r: Result, output_len: int) -> bool:
        return (r.ok and r.ttft_ms <= r.slo_ms
                and r.e2e_ms <= r.slo_ms + output_len * self.tpot_ms)


def goodput(results: Sequence[Result], reqs: Sequence[SimRequest], slo: Slo,
            window: tuple[float, float] | None = None) -> tuple[float, float]:
    """(goodput req/s, share of requests meeting both SLOs). ``window``: (from, to) in
    virtual ms; default: between the 10th and 90th percentile of end times."""
    ends = sorted(r.end_ms for r in results)
    if not ends:
        return 0.0, 0.0
    lo, hi = window or (ends[len(ends) // 10], ends[(9 * len(ends)) // 10])
    if hi <= lo:
        return 0.0, 0.0
    met = sum(1 for r, q in zip(results, reqs, strict=True)
              if lo <= r.end_ms < hi and slo.met(r, q.output_len))
    share = sum(1 for r, q in zip(results, reqs, strict=True) if slo.met(r, q.output_len))
    return met * 1000.0 / (hi - lo), share / len(results)


def predicted(lat: LatencyModel, items: Sequence[Item], dep: Deployment,
              cached: Sequence[int] | None = None) -> GroupProfile:
    wl = Workload.from_requests(lat, [(i.prompt_len, i.output_len) for i in items], cached)
    return from_latency(lat, wl, dep)


@dataclass
class SimControl:
    """Runs ``RatioController`` in the simulator's control hook.

    The controller sees what the live gateway sees: per group, what ended in the period
    (``GroupSnapshot``) and, for Eq. 1, the lengths of the requests that ended (the
    gateway knows prompt and output token counts) through ``lengths_of``. Spare pool:
    instances of the group named ``pool`` (which gets no traffic) are the spares; a
    borrow moves one into a group, a release moves it back.
    """

    lat: LatencyModel
    dep: Deployment
    cfg: ControllerConfig = field(default_factory=ControllerConfig)
    lengths_of: Callable[[str, float, float], list[tuple[int, int]]] | None = None
    pool: str = ""
    use_model: bool = True
    controller: RatioController = field(init=False)
    log: list[tuple[float, str, int, int, str]] = field(default_factory=list)
    moves: int = 0
    _last: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.controller = RatioController(self.cfg)

    def _profile(self, s: hook.GroupSnapshot) -> GroupProfile | None:
        if not self.use_model or self.lengths_of is None:
            return None
        lengths = self.lengths_of(s.group, s.now_ms - s.period_ms, s.now_ms)
        if len(lengths) < 8:
            return None
        wl = Workload.from_requests(self.lat, lengths)
        return from_latency(self.lat, wl, self.dep)

    def __call__(self, snaps: Sequence[hook.GroupSnapshot]) -> list[hook.Reassign]:
        views, spares = [], []
        # An instance drains out of its group's snapshot first: count it as "changing" in
        # the group it leaves and in the one it joins.
        changing: dict[str, int] = {}
        for s in snaps:
            for _, _, to_group in s.draining:
                changing[s.group] = changing.get(s.group, 0) + 1
                changing[to_group] = changing.get(to_group, 0) + 1
        for s in snaps:
            if s.group == self.pool:
                spares.extend(s.prefills + s.decodes)
                continue
            n = s.finished + s.failed
            obs = Obs(n, s.failed, s.mean_e2e_ms, s.ttft_share,
                      s.arrived * 1000.0 / max(s.period_ms, 1e-9), s.prefill_busy,
                      s.decode_busy)
            views.append(GroupView(s.group, obs, tuple(Member(i) for i in s.prefills),
                                   tuple(Member(i) for i in s.decodes),
                                   changing.get(s.group, 0), self._profile(s)))
        decisions = self.controller.decide(FleetView(tuple(views), tuple(sorted(spares))))
        out = []
        for d in decisions:
            if d.kind is Kind.RELEASE:
                out.append(hook.Reassign(d.instance_id, d.role, self.pool))
            else:
                out.append(hook.Reassign(d.instance_id, d.role, d.group))
            self.moves += 1
        for s in snaps:
            if s.group != self.pool:
                st = self.controller.state.get(s.group)
                last = st.last if st else ""
                prev = self._last.get(s.group)
                self._last[s.group] = last
                self.log.append((s.now_ms, s.group, s.n_p, s.n_d, last if last != prev else ""))
        return out


class ArrivedLengths:
    """``lengths_of`` for ``SimControl``: the (prompt, output) lengths of the requests
    that arrived in a window, per group (what the gateway knows at admission: the prompt
    and ``max_tokens``; the mock engine's answers are exactly ``max_tokens`` long).
    Open loop only: arrival times come from the requests."""

    def __init__(self, reqs: Sequence[SimRequest], names: dict[int, str]) -> None:
        self.by_group: dict[str, list[tuple[float, int, int]]] = {}
        for q in sorted(reqs, key=lambda q: q.arrival_ms):
            self.by_group.setdefault(names[q.group], []).append(
                (q.arrival_ms, q.prompt_len, q.output_len))
        self.times = {g: [t for t, _, _ in v] for g, v in self.by_group.items()}

    def __call__(self, group: str, lo: float, hi: float) -> list[tuple[int, int]]:
        from bisect import bisect_left

        ts = self.times.get(group, [])
        a, b = bisect_left(ts, lo), bisect_left(ts, hi)
        return [(p, o) for _, p, o in self.by_group[group][a:b]]
