"""Prefill-side timing: a lower bound on this worker's prefill time (early intervention)
and the KV lease it asks for when reserving before the compute."""

from __future__ import annotations

from collections import deque


class PrefillEstimator:
    """A lower bound on prefill time, learned from this worker's own prefills.

    ``n * r`` where r is the lowest ms-per-token seen over the last ``window`` prefills:
    fixed costs make short prompts' rates higher and attention makes long ones' higher,
    so the lowest rate is close to the marginal cost per token and never overstates how
    long a prefill takes. A request is only ended early when it surely misses."""

    def __init__(self, window: int = 256) -> None:
        self._rates: deque[float] = deque(maxlen=window)
        # The window's lowest rate, kept as rates come and go (None: not known, recomputed
        # on the next read). ``lower_bound_ms`` runs before every prefill, and a min over
        # the full window cost the fleet simulator about 2 us per request.
        self._min: float | None = None

    def observe(self, tokens: int, ms: float) -> None:
        if tokens > 0 and ms > 0:
            rate = ms / tokens
            rates = self._rates
            low = self._min
            if low is not None:
                if rate < low:
                    low = rate
                elif rates and len(rates) == rates.maxlen and rates[0] == low and rate > low:
                    low = None  # the lowest rate leaves the window: find the next one
            rates.append(rate)
            self._min = low

    def lower_bound_ms(self, tokens: int) -> float:
        if not self._rates:
            return 0.0
        low = self._min
        if low is None:
            low = self._min = min(self._rates)
        return tokens * low

    def upper_ms(self, tokens: int) -> float:
        """``n`` times the slowest rate seen: generous, for sizing leases, never for
        deciding that a request misses."""
        return tokens * max(self._rates) if self._rates else 0.0


def reservation_lease_ms(after_compute_s: float, estimator: PrefillEstimator,
                         tokens: int) -> int:
    """Lease to ask the kvstore for when reserving before the compute: the lease for the
    handoff plus twice the slowest-rate estimate of the compute ahead. A fixed lease made
    long prompts on a busy host (a 4k SmolLM2 prefill took 9-20 s here against a 30 s
    lease) race the sweeper; a dead prefill's reservation still expires."""
    return int(after_compute_s * 1000 + 2 * estimator.upper_ms(tokens))
