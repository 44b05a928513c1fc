"""The settings optimiser: per request, choose (N, rho, tau) (pure, no I/O).

Timeline of one pd_device request (times from the user's enter, ms; P/D-Device's
timeline as docs/pd-device.md makes it concrete):

  A_1    = RTT + upload(n) + TTFT_c(n)          the cloud's first token reaches the device
  D_j    = A_1 + (j - 1) * tau                  display time of token j (controller pace)
  s      = 0 if rho == 1 else A_1               device prefill start: P is local, P' comes
                                                with the first token
  R_k    = s + T_pf(rho * n + k) + chunks(k)    the device cache covers P' + r_1..r_k
           * ``chunks`` is a fixed overhead per catch-up chunk

  H      = 3 * G_c(n) if 1.5 * G_c(n) > tpot_max, else 0
                                                first-token hold cap: G_c(n) is the cloud's
                                                t1 -> t2 gap (its prefill -> decode KV
                                                handoff). With a hold the controller shows
                                                t1 when t2 has arrived (at most H late), so
                                                that gap never shows; TTFT grows by the gap
                                                actually seen. The TTFT constraint counts
                                                1.5 * G_c(n) (the cap is a bound for the
                                                controller, not the expected hold), and
                                                the device gets no credit for the hold
                                                (the display may start as early as A_1).

Constraints:
  TTFT      A_1 + H/2 <= ttft_target
  cloud     tau >= TPOT_c * (1 + jitter)      cloud tokens are in hand when due
  device    R_k <= D_{k+1} = A_1 + k * tau    the device is ready before token k+1 is due
  smooth    max(tau, t_dev) <= tpot_max       displayed gaps before and after hand-off
  quality   q(rho) >= q_min
  budget    N = k + margin(k) <= G            margin covers the device running late

Objective, lexicographic: least cloud occupancy  T_c_prefill(n) + N * TPOT_c, then the
fastest display (least tau), then the least refinement (largest rho).

For fixed rho the device constraint is ``f(k) = R_k - A_1 - k*tau <= 0``. Its feasible
set in k is not assumed to be an interval (T_pf is a measured curve), so the solver
scans k upward with tau at its largest allowed value (a larger tau only helps the
device) and stops at the first feasible k: the least N. Then the least tau for that k
is closed-form, ``max(tau_lo, (R_k - A_1) / k)``. ``brute_force`` in the tests
enumerates (rho, k, tau-grid) and must agree.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Curve:
    """A measured latency curve: piecewise-linear in n, linear extrapolation past the ends."""

    points: tuple[tuple[float, float], ...]  # (n, ms), n ascending

    def __post_init__(self) -> None:
        if not self.points:
            raise ValueError("a curve needs at least one point")
        ns = [n for n, _ in self.points]
        if ns != sorted(ns) or len(set(ns)) != len(ns):
            raise ValueError("curve points must have strictly ascending n")

    @classmethod
    def linear(cls, fixed_ms: float, per_token_ms: float) -> Curve:
        return cls(((0.0, fixed_ms), (1000.0, fixed_ms + 1000.0 * per_token_ms)))

    def __call__(self, n: float) -> float:
        p = self.points
        if len(p) == 1:
            return p[0][1]
        i = bisect.bisect_left([x for x, _ in p], n)
        i = min(max(i, 1), len(p) - 1)
        (x0, y0), (x1, y1) = p[i - 1], p[i]
        return max(0.0, y0 + (y1 - y0) * (n - x0) / (x1 - x0))


@dataclass(frozen=True)
class Profiles:
    """What the optimiser knows about the device, the cloud and the link."""

    device_prefill: Curve  # T_pf(n), ms
    device_tpot_ms: float  # t_dev
    cloud_ttft: Curve  # TTFT_c(n) at the cloud (prefill + first token), ms
    cloud_tpot_ms: float  # TPOT_c
    rtt_ms: float = 50.0
    bandwidth_mbps: float = 50.0  # device -> cloud; the prompt goes up as 4-byte ids
    chunk_overhead_ms: float = 5.0  # fixed cost per catch-up chunk on the device
    chunk_tokens: int = 256
    jitter: float = 0.2  # relative slack on TPOT_c for network/cloud jitter
    margin_frac: float = 0.25  # extra budget tokens beyond k, relative to k ...
    min_margin: int = 4  # ... and at least this many
    cloud_t2_gap: Curve | None = None  # G_c(n): t1 -> t2 gap at the cloud; None: no hold
    # Relative slack on G_c when deciding whether a hold is needed; the cap is twice
    # that. The KV handoff varies far more than TPOT_c under load.
    hold_jitter: float = 0.5

    def upload_ms(self, n: int) -> float:
        return n * 4 * 8 / (self.bandwidth_mbps * 1e3)

    def first_arrival_ms(self, n: int) -> float:
        return self.rtt_ms + self.upload_ms(n) + self.cloud_ttft(n)

    def device_ready_ms(self, n: int, rho: float, k: int) -> float:
        """R_k: when the device cache covers P' + r_1..r_k."""
        m = refined_len(n, rho)
        start = 0.0 if rho >= 1.0 else self.first_arrival_ms(n)
        chunks = math.ceil((m + k) / self.chunk_tokens)
        return start + self.device_prefill(m + k) + chunks * self.chunk_overhead_ms

    def margin(self, k: int) -> int:
        return max(self.min_margin, math.ceil(self.margin_frac * k))

    def hold_ms(self, n: int, tpot_max_ms: float) -> float:
        """H: the first token's hold cap (0: the t1 -> t2 gap fits under tpot_max)."""
        if self.cloud_t2_gap is None:
            return 0.0
        gap = self.cloud_t2_gap(n) * (1 + self.hold_jitter)
        return 2.0 * gap if gap > tpot_max_ms else 0.0

    def first_display_ms(self, n: int, tpot_max_ms: float) -> float:
        """When t1 is expected on screen: A_1, plus the expected hold (half the cap)."""
        return self.first_arrival_ms(n) + self.hold_ms(n, tpot_max_ms) / 2


@dataclass(frozen=True)
class Constraints:
    ttft_target_ms: float = 1000.0
    tpot_max_ms: float = 50.0
    min_quality: float = 0.0
    tau_min_ms: float = 10.0  # the controller never paces faster than this
    quality: Mapping[float, float] = field(default_factory=lambda: {1.0: 1.0})  # rho -> q


@dataclass(frozen=True)
class Plan:
    mode: str  # "pd_device", "cloud_only" or "device_only"
    n_budget: int = 0  # N: cloud decode budget (tokens, first token included)
    rho: float = 1.0
    tau_ms: float = 0.0
    k: int = 0  # planned hand-off point
    cloud_ms: float = 0.0  # planned cloud occupancy
    ttft_ms: float = 0.0
    reason: str = ""
    hold_ms: float = 0.0  # H: the first token's hold (cloud-served plans)


def refined_len(n: int, rho: float) -> int:
    return max(1, min(n, math.ceil(rho * n)))


def cloud_occupancy(p: Profiles, n: int, n_budget: int) -> float:
    return p.cloud_ttft(n) + max(0, n_budget - 1) * p.cloud_tpot_ms


def feasible(p: Profiles, c: Constraints, n: int, out_len: int, rho: float, k: int,
             tau: float) -> bool:
    """Every constraint of the module docstring, checked directly."""
    a1 = p.first_arrival_ms(n)
    return (k >= 1 and p.first_display_ms(n, c.tpot_max_ms) <= c.ttft_target_ms
            and tau >= max(c.tau_min_ms, p.cloud_tpot_ms * (1 + p.jitter)) - 1e-9
            and max(tau, p.device_tpot_ms) <= c.tpot_max_ms + 1e-9
            and c.quality.get(rho, 0.0) >= c.min_quality
            and k + p.margin(k) <= out_len
            and p.device_ready_ms(n, rho, k) <= a1 + k * tau + 1e-9)


def choose(p: Profiles, c: Constraints, n: int, out_len: int) -> Plan:
    """The plan for a prompt of ``n`` tokens and an expected answer of ``out_len``."""
    hold = p.hold_ms(n, c.tpot_max_ms)
    a1 = p.first_arrival_ms(n)
    d1 = p.first_display_ms(n, c.tpot_max_ms)
    tau_lo = max(c.tau_min_ms, p.cloud_tpot_ms * (1 + p.jitter))
    tau_hi = c.tpot_max_ms
    best: tuple[float, float, float, Plan] | None = None
    if d1 <= c.ttft_target_ms and tau_lo <= tau_hi and p.device_tpot_ms <= tau_hi:
        for rho in sorted(c.quality, reverse=True):
            if c.quality[rho] < c.min_quality:
                continue
            for k in range(1, out_len + 1):
                if k + p.margin(k) > out_len:
                    break
                slack = p.device_ready_ms(n, rho, k) - a1
                if slack <= k * tau_hi + 1e-9:
                    tau = max(tau_lo, slack / k)
                    nb = k + p.margin(k)
                    occ = cloud_occupancy(p, n, nb)
                    plan = Plan("pd_device", nb, rho, tau, k, occ, d1, hold_ms=hold)
                    key = (occ, tau, -rho, plan)
                    if best is None or key[:3] < best[:3]:
                        best = key
                    break
    if best is not None:
        return best[3]
    return fallback(p, c, n, out_len)


def fallback(p: Profiles, c: Constraints, n: int, out_len: int) -> Plan:
    """No assisted plan fits: the cloud serves the whole answer if it meets the TTFT
    target, else whichever side shows the first token sooner (the user still gets an
    answer). A congested cloud can miss the target, but a device prefilling 8k tokens
    alone would miss it by far more (a bench run showed 20 s)."""
    hold = p.hold_ms(n, c.tpot_max_ms)
    a1 = p.first_display_ms(n, c.tpot_max_ms)
    cloud_ok = p.cloud_tpot_ms <= c.tpot_max_ms
    if cloud_ok and (a1 <= c.ttft_target_ms or a1 < p.device_prefill(n)):
        return Plan("cloud_only", out_len, 1.0, max(c.tau_min_ms, p.cloud_tpot_ms), 0,
                    cloud_occupancy(p, n, out_len), a1, "no hand-off point meets the constraints",
                    hold_ms=hold)
    return Plan("device_only", 0, 1.0, p.device_tpot_ms, 0, 0.0, p.device_prefill(n),
                "the cloud cannot meet the TTFT target")


def brute_force(p: Profiles, c: Constraints, n: int, out_len: int,
                taus: Sequence[float]) -> Plan | None:
    """Exhaustive search over (rho, k, tau in ``taus``); for tests."""
    best: tuple[float, float, float, Plan] | None = None
    for rho in c.quality:
        for k in range(1, out_len + 1):
            for tau in taus:
                if feasible(p, c, n, out_len, rho, k, tau):
                    nb = k + p.margin(k)
                    occ = cloud_occupancy(p, n, nb)
                    a1 = p.first_display_ms(n, c.tpot_max_ms)
                    key = (occ, tau, -rho, Plan("pd_device", nb, rho, tau, k, occ, a1,
                                                hold_ms=p.hold_ms(n, c.tpot_max_ms)))
                    if best is None or key[:3] < best[:3]:
                        best = key
    return best[3] if best else None
