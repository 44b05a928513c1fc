"""PrefillEstimator: a lower bound on prefill time from the worker's own history."""

from __future__ import annotations

import pytest

from services.prefill.estimator import PrefillEstimator, reservation_lease_ms

pytestmark = pytest.mark.unit


def test_no_history_never_ends_a_request() -> None:
    assert PrefillEstimator().lower_bound_ms(100_000) == 0.0


def test_lower_bound_never_exceeds_what_was_observed() -> None:
    est = PrefillEstimator()

    def cost(n: int) -> float:  # fixed cost + linear + attention, like a real prefill
        return 15 + 0.05 * n + 1.5e-6 * n * n

    for n in (64, 512, 2048, 8192, 16384):
        est.observe(n, cost(n))
    for n in (32, 100, 1000, 5000, 20000):
        assert est.lower_bound_ms(n) <= cost(n)
    assert est.lower_bound_ms(8192) > 0.8 * cost(8192)  # yet close enough to be useful


def test_window_forgets_old_speed() -> None:
    est = PrefillEstimator(window=4)
    est.observe(100, 1.0)  # a fast past
    for _ in range(4):
        est.observe(100, 10.0)
    assert est.lower_bound_ms(100) == pytest.approx(10.0)


def test_ignores_empty_observations() -> None:
    est = PrefillEstimator()
    est.observe(0, 5.0)
    est.observe(10, 0.0)
    assert est.lower_bound_ms(10) == 0.0


def test_the_reservation_lease_covers_the_compute_ahead() -> None:
    est = PrefillEstimator()
    assert reservation_lease_ms(30.0, est, 4096) == 30_000  # nothing seen: the base lease
    est.observe(1000, 500.0)  # 0.5 ms/token
    est.observe(1000, 2000.0)  # 2 ms/token on a busy host
    assert est.upper_ms(4096) == 8192.0
    assert reservation_lease_ms(30.0, est, 4096) == 30_000 + 2 * 8192
    assert est.lower_bound_ms(4096) == 2048.0  # deadlines still use the optimistic bound


@pytest.mark.parametrize("window", [1, 3, 16])
def test_the_kept_lowest_rate_is_the_windows_minimum(window: int) -> None:
    """``lower_bound_ms`` keeps the window's lowest rate instead of scanning the window:
    it must be exactly ``tokens * min(last window rates)`` after any sequence, including
    repeated minima leaving the window and reads between observations or not."""
    import random
    from collections import deque

    rng = random.Random(window)
    est = PrefillEstimator(window=window)
    seen: deque[float] = deque(maxlen=window)
    for i in range(3000):
        tokens, ms = rng.choice([0, 1, 7, 100]), rng.choice([0.0, 1.0, 2.0, 3.0, rng.random()])
        est.observe(tokens, ms)
        if tokens > 0 and ms > 0:
            seen.append(ms / tokens)
        if i % 3:  # reads at some points only: the kept value must survive unread steps
            assert est.lower_bound_ms(1000) == (1000 * min(seen) if seen else 0.0)
