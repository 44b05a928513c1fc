"""P/D-Serve's E2E performance model (§1.1, Eq. 1), pure: no I/O, no clock.

    Φ   = min{ I_t , n_p·b_p/T_p , n_d·b_d/T_d } / (n_p + n_d)
    T_p = TTFT_bs · r_pre
    T_d = ξ + TPOT_bs · G
    best ratio (Eq. 1): n_p·b_p/T_p ≈ n_d·b_d/T_d,  i.e.  n_p : n_d ≈ b_d·T_p : b_p·T_d

Conventions here (our system, not the paper's, where it had to choose):
- ``G`` counts the tokens the *decode* instance generates: a request of ``out`` tokens
  has ``out - 1`` decode steps, because the prefill emits the first token.
- A prefill slot is held until its KV is handed off (ours is), so a prefill batch
  occupies its slots for ``T_p + hold`` with ``hold = ξ``; the E2E still counts ξ once.
- Instance counts are whole; ``best_split`` searches them exhaustively (n ≤ thousands),
  so the integer optimum is exact and no rounding of the continuous ratio is needed.
- No single point of failure: a role keeps ``min_per_role(total)`` instances
  (2 when the group has ≥ 4, else 1) — the paper's rule, made concrete.

Where the inputs come from (``GroupProfile``):
- ``from_latency``: a latency model (the mock engine's ``LatencyModel``, which is also
  what ``bench/profile_model.py`` writes) plus a workload sample and the deployment
  (b_p, decode slots, KV room, KV link). KV room bounds b_d: a decode cannot batch more
  sequences than its pool holds, and an optional TPOT SLO bounds it further.
- ``LiveEstimate``: per-request timings the gateway observes (prefill ms, transfer ms,
  TPOT, tokens) and the slots instances report, averaged; see ``controller``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

PREFILL = "prefill"
DECODE = "decode"
TRAFFIC = "traffic"


def min_per_role(total: int) -> int:
    """Instances a role keeps so that one failure never empties it: 2 when the group has
    room for 2 + 2, else 1 (a 2- or 3-instance group cannot avoid a single point)."""
    return 2 if total >= 4 else 1


class Latency(Protocol):
    """What a latency model offers (``services.engine.mock.LatencyModel`` does)."""

    def prefill_ms(self, n: int, cached: int = 0) -> float: ...

    def step_ms(self, contexts: list[int]) -> float: ...


@dataclass(frozen=True)
class GroupProfile:
    """Eq. 1's inputs for one group. Times in ms, rates in requests/s."""

    ttft_bs_ms: float  # TTFT_bs: one prefill instance's time for a batch of b_p prompts
    tpot_bs_ms: float  # TPOT_bs: one decode step at batch b_d
    b_p: float
    b_d: float
    g: float  # G: decode steps per request (generated tokens - 1)
    r_pre: float = 1.0  # prefix-cache speed-up factor, (0, 1]
    xi_ms: float = 0.0  # ξ: KV transfer time (the slowest sub-transfer)
    hold_ms: float = 0.0  # a prefill slot's extra hold after compute (KV handoff)
    # The prefill utilisation the TTFT SLO allows (1: the paper's Eq. 1). Waiting at a
    # prefill costs TTFT, which the SLO bounds tightly; waiting for a decode slot only
    # stretches E2E. A scheduler that collapses near saturation needs headroom.
    u_p: float = 1.0

    def __post_init__(self) -> None:
        if self.ttft_bs_ms <= 0 or self.tpot_bs_ms <= 0:
            raise ValueError("TTFT_bs and TPOT_bs must be positive")
        if self.b_p <= 0 or self.b_d <= 0:
            raise ValueError("batch sizes b_p and b_d must be positive")
        if not 0 < self.r_pre <= 1:
            raise ValueError("r_pre must be in (0, 1]")
        if self.g < 0 or self.xi_ms < 0 or self.hold_ms < 0:
            raise ValueError("G, ξ and the hold time cannot be negative")
        if not 0 < self.u_p <= 1:
            raise ValueError("the prefill utilisation target u_p must be in (0, 1]")

    @property
    def t_p_ms(self) -> float:
        return self.ttft_bs_ms * self.r_pre

    @property
    def t_d_ms(self) -> float:
        return self.xi_ms + self.tpot_bs_ms * self.g

    @property
    def e2e_ms(self) -> float:
        """E2E without waiting: T_p + T_d."""
        return self.t_p_ms + self.t_d_ms

    @property
    def ttft_share(self) -> float:
        """T_p / E2E without waiting (the §1.3 signal's no-load value)."""
        return self.t_p_ms / self.e2e_ms

    def prefill_rate(self, n_p: int) -> float:
        """n_p·b_p / T_p in requests/s (slots held for T_p + hold)."""
        return n_p * self.b_p * 1000.0 / (self.t_p_ms + self.hold_ms)

    def decode_rate(self, n_d: int) -> float:
        """n_d·b_d / T_d in requests/s."""
        return n_d * self.b_d * 1000.0 / max(self.t_d_ms, 1e-9)

    def capacity(self, n_p: int, n_d: int) -> float:
        """min(u_p x prefill rate, decode rate): what the split carries within its SLO."""
        return min(self.u_p * self.prefill_rate(n_p), self.decode_rate(n_d))

    def phi(self, n_p: int, n_d: int, traffic: float = math.inf) -> float:
        """Φ: throughput per instance (requests/s per instance)."""
        if n_p + n_d <= 0:
            return 0.0
        return min(traffic, self.capacity(n_p, n_d)) / (n_p + n_d)

    def bottleneck(self, n_p: int, n_d: int, traffic: float = math.inf) -> str:
        """``traffic`` when the group keeps up (no waiting), else the weaker role."""
        pr, dr = self.u_p * self.prefill_rate(n_p), self.decode_rate(n_d)
        if traffic <= min(pr, dr):
            return TRAFFIC
        return PREFILL if pr <= dr else DECODE

    def eq1_ratio(self) -> float:
        """The continuous optimum n_p / n_d = b_d·(T_p + hold) / (u_p·b_p·T_d)."""
        return self.b_d * (self.t_p_ms + self.hold_ms) / (
            self.u_p * self.b_p * max(self.t_d_ms, 1e-9))

    def with_workload(self, g: float | None = None, r_pre: float | None = None) -> GroupProfile:
        return replace(self, g=self.g if g is None else g,
                       r_pre=self.r_pre if r_pre is None else r_pre)

    def with_prefill_util(self, u_p: float) -> GroupProfile:
        return replace(self, u_p=u_p)


@dataclass(frozen=True)
class Split:
    n_p: int
    n_d: int
    phi: float  # requests/s per instance
    capacity: float  # min(prefill, decode) rate, requests/s
    bottleneck: str

    @property
    def total(self) -> int:
        return self.n_p + self.n_d

    def __str__(self) -> str:
        return f"P{self.n_p}/D{self.n_d}"


def split_at(profile: GroupProfile, n_p: int, n_d: int, traffic: float = math.inf) -> Split:
    return Split(n_p, n_d, profile.phi(n_p, n_d, traffic), profile.capacity(n_p, n_d),
                 profile.bottleneck(n_p, n_d, traffic))


def best_split(profile: GroupProfile, total: int, traffic: float = math.inf,
               floor: int | None = None) -> Split:
    """The n_p : n_d of ``total`` instances with the highest capacity (Eq. 1 in whole
    instances: maximising min(prefill, decode rate) is minimising the mismatch), keeping
    ``floor`` (default ``min_per_role``) of each role. Ties (traffic-bound, or equal
    capacity) go to the smaller mismatch |prefill - decode rate|."""
    if total < 2:
        raise ValueError("a group needs at least one prefill and one decode")
    lo = min_per_role(total) if floor is None else max(1, floor)
    lo = min(lo, total // 2)
    best: tuple[float, float, int] | None = None
    for n_p in range(lo, total - lo + 1):
        cap = profile.capacity(n_p, total - n_p)
        mismatch = abs(profile.u_p * profile.prefill_rate(n_p) - profile.decode_rate(total - n_p))
        key = (cap, -mismatch, -n_p)
        if best is None or key > best:
            best = key
    assert best is not None
    n_p = -best[2]
    return split_at(profile, n_p, total - n_p, traffic)


def required(profile: GroupProfile, traffic: float, headroom: float = 1.0,
             floor: int = 2) -> Split:
    """The fewest instances per role that carry ``traffic`` times ``headroom`` (each role at
    least ``floor``): what a group with a spare pool should hold."""
    need = traffic * headroom
    n_p = max(floor, math.ceil(need * (profile.t_p_ms + profile.hold_ms)
                               / (1000.0 * profile.b_p * profile.u_p) - 1e-9))
    n_d = max(floor, math.ceil(need * profile.t_d_ms / (1000.0 * profile.b_d) - 1e-9))
    return split_at(profile, n_p, n_d, traffic)


def allocate(groups: Mapping[str, tuple[GroupProfile, float]], total: int,
             floor: int = 2) -> dict[str, Split]:
    """Share ``total`` instances among groups ``{name: (profile, traffic)}``: each group
    gets ``floor`` per role, then each further instance goes where it raises the lowest
    served fraction min(capacity, traffic) / traffic the most (water filling over
    groups and roles). Raises if ``total`` cannot give every group its floor."""
    if total < 2 * floor * len(groups):
        raise ValueError(f"{total} instances cannot give {len(groups)} groups "
                         f"{floor} prefill + {floor} decode each")
    alloc = {g: [floor, floor] for g in groups}

    def served(g: str, n_p: int, n_d: int) -> float:
        prof, traffic = groups[g]
        return prof.capacity(n_p, n_d) / traffic if traffic > 0 else math.inf

    for _ in range(total - 2 * floor * len(groups)):
        worst = min(groups, key=lambda g: (served(g, *alloc[g]), g))
        n_p, n_d = alloc[worst]
        prof = groups[worst][0]
        if prof.u_p * prof.prefill_rate(n_p) <= prof.decode_rate(n_d):
            alloc[worst][0] += 1
        else:
            alloc[worst][1] += 1
    return {g: split_at(groups[g][0], n_p, n_d, groups[g][1])
            for g, (n_p, n_d) in alloc.items()}


# -- profiles from a latency model and a workload ---------------------------------------

@dataclass(frozen=True)
class Workload:
    """A group's request mix, summarised for Eq. 1. ``from_requests`` builds it."""

    prefill_ms: float  # mean prefill compute per request, prefix hits included
    prefill_ms_uncached: float  # the same without prefix hits (r_pre's denominator)
    prompt_len: float
    output_len: float
    decode_ctx: float  # token-weighted mean context during decode
    kv_tokens: float  # mean tokens a sequence holds in the decode pool at its end

    @staticmethod
    def from_requests(latency: Latency, requests: Iterable[tuple[int, int]],
                      cached: Iterable[int] | None = None) -> Workload:
        """``requests``: (prompt tokens, output tokens); ``cached``: prefix-hit tokens of
        each (same order), if known."""
        reqs = list(requests)
        if not reqs:
            raise ValueError("an empty workload has no profile")
        hits = list(cached) if cached is not None else [0] * len(reqs)
        n = len(reqs)
        pf = sum(latency.prefill_ms(p, c) for (p, _), c in zip(reqs, hits, strict=True)) / n
        pf0 = sum(latency.prefill_ms(p) for p, _ in reqs) / n
        steps = sum(max(o - 1, 0) for _, o in reqs)
        ctx = (sum(max(o - 1, 0) * (p + o / 2) for p, o in reqs) / steps if steps
               else sum(p for p, _ in reqs) / n)
        return Workload(pf, pf0, sum(p for p, _ in reqs) / n, sum(o for _, o in reqs) / n, ctx,
                        sum(p + o for p, o in reqs) / n)

    def scaled_output(self, factor: float) -> Workload:
        """The same prompts with ``factor`` times the output (the §1.3 Td+ case)."""
        return replace(self, output_len=self.output_len * factor,
                       decode_ctx=self.prompt_len + (self.decode_ctx - self.prompt_len) * factor,
                       kv_tokens=self.prompt_len + (self.kv_tokens - self.prompt_len) * factor)


@dataclass(frozen=True)
class Deployment:
    """How instances are configured: the b_p, b_d and KV limits Eq. 1 sees."""

    prefill_slots: int = 1  # b_p
    decode_slots: int = 16  # the decode's batch cap
    kv_pool_tokens: int = 0  # decode KV room in tokens (0: unbounded)
    kv_bytes_per_token: int = 12 * 1024
    kv_gbps: float = 10.0  # GB/s of the KV link
    # True when a prefill's slots compute concurrently (the simulator); False when one
    # model thread runs them one after another (the worker), so b_p slots take b_p times
    # as long and only overlap the KV handoff.
    prefill_parallel: bool = True
    tpot_slo_ms: float = 0.0  # cap b_d so a step stays within it (0: no cap)
    prefill_util: float = 1.0  # u_p: the prefill utilisation the TTFT SLO allows


def effective_b_d(latency: Latency, wl: Workload, dep: Deployment) -> int:
    """The decode batch the deployment can run: the slot cap, the KV room for whole
    sequences, and the TPOT SLO, whichever binds first (at least 1)."""
    b = dep.decode_slots
    if dep.kv_pool_tokens > 0:
        b = min(b, int(dep.kv_pool_tokens // max(wl.kv_tokens, 1.0)))
    b = max(1, b)
    if dep.tpot_slo_ms > 0:
        ctx = max(1, round(wl.decode_ctx))
        while b > 1 and latency.step_ms([ctx] * b) > dep.tpot_slo_ms:
            b -= 1
    return b


def from_latency(latency: Latency, wl: Workload, dep: Deployment) -> GroupProfile:
    """Eq. 1's inputs for a workload on a deployment, from a latency model."""
    b_p = max(1, dep.prefill_slots)
    b_d = effective_b_d(latency, wl, dep)
    xi = wl.prompt_len * dep.kv_bytes_per_token / (dep.kv_gbps * 1e6)
    ttft_bs = wl.prefill_ms_uncached * (1 if dep.prefill_parallel else b_p)
    r_pre = min(1.0, max(1e-6, wl.prefill_ms / wl.prefill_ms_uncached))
    tpot_bs = latency.step_ms([max(1, round(wl.decode_ctx))] * b_d)
    return GroupProfile(ttft_bs_ms=ttft_bs, tpot_bs_ms=tpot_bs, b_p=b_p, b_d=b_d,
                        g=max(wl.output_len - 1, 0.0), r_pre=r_pre, xi_ms=xi, hold_ms=xi,
                        u_p=dep.prefill_util)


@dataclass
class LiveEstimate:
    """Eq. 1's inputs for one group from what the live cluster shows: the timings the
    gateway gets with every finished request (prefill compute, KV transfer, mean TPOT,
    tokens) and the batch sizes instances report. Exponential moving averages, so the
    profile follows a workload shift within a few tens of requests; TPOT is fitted
    against the decode batch it was measured at (TPOT = t0 + t1·B, least squares over
    decayed sums), so it extrapolates to the decode's full batch b_d."""

    alpha: float = 0.05
    prefill_ms: float = 0.0
    xi_ms: float = 0.0
    out_tokens: float = 0.0
    samples: int = 0
    _sw: float = 0.0  # decayed sums for the TPOT(B) fit
    _sb: float = 0.0
    _st: float = 0.0
    _sbb: float = 0.0
    _sbt: float = 0.0

    def observe(self, prefill_ms: float, xi_ms: float, tpot_ms: float, out_tokens: int,
                decode_batch: float = 1.0) -> None:
        a = 1.0 if self.samples == 0 else self.alpha
        self.prefill_ms += a * (prefill_ms - self.prefill_ms)
        self.xi_ms += a * (xi_ms - self.xi_ms)
        self.out_tokens += a * (out_tokens - self.out_tokens)
        if out_tokens > 1 and tpot_ms > 0:
            keep, b = 1.0 - self.alpha, max(1.0, decode_batch)
            self._sw = keep * self._sw + 1.0
            self._sb = keep * self._sb + b
            self._st = keep * self._st + tpot_ms
            self._sbb = keep * self._sbb + b * b
            self._sbt = keep * self._sbt + b * tpot_ms
        self.samples += 1

    def tpot_at(self, batch: float) -> float:
        """TPOT at ``batch`` from the fit; the mean TPOT when batches never varied."""
        if self._sw <= 0:
            return 0.0
        mb, mt = self._sb / self._sw, self._st / self._sw
        var = self._sbb / self._sw - mb * mb
        slope = max(0.0, (self._sbt / self._sw - mb * mt) / var) if var > 1e-6 else 0.0
        return max(1e-3, mt + slope * (batch - mb))

    def profile(self, b_p: float, b_d: float, prefill_parallel: bool = False,
                min_samples: int = 8) -> GroupProfile | None:
        """None until ``min_samples`` requests were seen. ``prefill_ms`` already includes
        prefix hits, so r_pre is 1 here (the hit rate is in the measured time)."""
        if self.samples < min_samples or self.prefill_ms <= 0 or self._sw <= 0:
            return None
        ttft_bs = self.prefill_ms * (1.0 if prefill_parallel else b_p)
        return GroupProfile(ttft_bs_ms=ttft_bs, tpot_bs_ms=self.tpot_at(b_d), b_p=b_p, b_d=b_d,
                            g=max(self.out_tokens - 1.0, 0.0), xi_ms=self.xi_ms,
                            hold_ms=self.xi_ms)


def sweep(profile: GroupProfile, total: int, traffic: float = math.inf,
          floor: int = 1) -> list[Split]:
    """Every split of ``total`` with at least ``floor`` per role (for plots)."""
    return [split_at(profile, n_p, total - n_p, traffic)
            for n_p in range(floor, total - floor + 1)]


def ranked(splits: Sequence[Split]) -> list[Split]:
    return sorted(splits, key=lambda s: -s.capacity)
