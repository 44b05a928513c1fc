"""Speed controller: first token at once, smooth bounded pace under bursty arrivals."""

from __future__ import annotations

import itertools
import random

import pytest

from services.device.controller import (
    ControllerConfig,
    SpeedController,
    gaps,
    percentile,
    simulate,
)


def bursty(n: int, tpot: float, burst: int, start: float = 200.0) -> list[float]:
    """Tokens made every ``tpot`` ms but delivered ``burst`` at a time (WAN batching)."""
    return [start + ((i // burst) + 1) * burst * tpot for i in range(n)]


def test_first_token_is_shown_on_arrival() -> None:
    shown = simulate([123.0, 124.0, 125.0], ControllerConfig())
    assert shown[0] == 123.0
    assert shown[1] > 124.0  # the rest is paced, not dumped


def test_display_is_ordered_and_never_before_arrival() -> None:
    rng = random.Random(1)
    t, arrivals = 0.0, []
    for _ in range(300):
        t += rng.expovariate(1 / 25.0)
        arrivals.append(t)
    shown = simulate(arrivals, ControllerConfig(tau_ms=25.0))
    assert all(s >= a for s, a in zip(shown, arrivals, strict=True))
    assert all(b >= a for a, b in itertools.pairwise(shown))


def test_bursts_are_smoothed_and_bounded() -> None:
    cfg = ControllerConfig(tau_ms=20.0, tau_min_ms=10.0, tau_max_ms=50.0)
    arrivals = bursty(400, tpot=20.0, burst=10)
    raw = gaps(arrivals)
    shown = gaps(simulate(arrivals, cfg))
    # Display on arrival would show 0 ms and 200 ms gaps; the controller spreads them.
    assert max(raw) == pytest.approx(200.0)
    tail = shown[20:]  # after the first burst period, the supply rate is known
    # The figures docs/pd-device.md quotes: max 30.0, p99 25.0, min 20.0 ms (deterministic).
    assert max(tail) == pytest.approx(30.0, abs=0.05)
    assert percentile(tail, 99) == pytest.approx(25.0, abs=0.05)
    assert min(tail) == pytest.approx(20.0, abs=0.05)
    assert max(tail) <= cfg.tau_max_ms + 1e-9
    assert min(tail) >= cfg.tau_min_ms - 1e-9
    # The average pace follows the supply: the buffer neither grows nor starves.
    assert sum(tail) / len(tail) == pytest.approx(20.0, rel=0.1)


def test_late_cloud_slows_the_pace_gradually() -> None:
    # 40 tokens at 20 ms, then the cloud slows to 45 ms per token.
    arr = [i * 20.0 for i in range(40)] + [780.0 + i * 45.0 for i in range(1, 60)]
    cfg = ControllerConfig(tau_ms=20.0, step_ms=5.0)
    g = gaps(simulate(arr, cfg))
    steps = [abs(b - a) for a, b in itertools.pairwise(g)]
    assert max(g) == pytest.approx(cfg.tau_max_ms)  # docs: max 50.0 ms (= tau_max)
    assert max(g) <= cfg.tau_max_ms
    # Smooth: between two paced releases, the pace changes by at most step_ms (a stall,
    # when the buffer is empty, shows the token on arrival and is the only exception).
    assert percentile(steps, 90) <= cfg.step_ms + 1e-9


def test_controller_drop_buffered_keeps_head() -> None:
    ctl = SpeedController(ControllerConfig())
    for i, t in enumerate([0.0, 1.0, 2.0, 3.0]):
        ctl.push(i, t)
    assert [t for t, _ in ctl.pop_due(0.0)] == [0]
    assert ctl.drop_buffered(1) == [2, 3]
    assert ctl.buffered == 1


def test_config_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        ControllerConfig(tau_ms=5.0, tau_min_ms=10.0)


def test_percentile_nearest_rank() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([], 99) == 0.0


def test_display_never_runs_ahead_of_the_planned_pace() -> None:
    # The cloud is 6x faster than the plan: the display keeps the planned pace, which is
    # what the device's catch-up was sized against.
    cfg = ControllerConfig(tau_ms=30.0)
    g = gaps(simulate([i * 5.0 for i in range(100)], cfg))
    assert min(g) >= 30.0 - 1e-9


def test_retarget_steps_down_to_the_local_pace_smoothly() -> None:
    # Before the hand-off the plan paces at 48 ms; afterwards the device's own tokens come
    # every 35 ms and the display steps down to them, at most step_ms per token.
    cfg = ControllerConfig(tau_ms=48.0, tau_max_ms=48.0, step_ms=5.0)
    ctl = SpeedController(cfg)
    shown: list[float] = []
    t = 0.0
    for i in range(10):  # cloud tokens, all in hand
        ctl.push(i, t)
    while ctl.buffered:
        due = ctl.next_release()
        assert due is not None
        shown.extend(d for _, d in ctl.pop_due(due))
    ctl.retarget(35.0, gain=0.0)
    t = shown[-1]
    for i in range(30):  # local tokens at the device's TPOT
        t += 35.0
        ctl.push(100 + i, t)
        while (due := ctl.next_release()) is not None and due <= t:
            shown.extend(d for _, d in ctl.pop_due(due))
    while (due := ctl.next_release()) is not None:
        shown.extend(d for _, d in ctl.pop_due(due))
    g = gaps(shown)
    assert max(g) <= 48.0 + 1e-9
    assert all(abs(b - a) <= 5.0 + 1e-9 for a, b in itertools.pairwise(g[:12]))
    assert g[-1] == pytest.approx(35.0)
    assert ctl.cfg.gain == 0.0 and ctl.cfg.tau_ms == 35.0


def test_first_token_hold_absorbs_the_clouds_handoff_gap() -> None:
    # The cloud's t1 -> t2 gap is 110 ms (its KV handoff), then 15 ms per token.
    arrivals = [100.0, 210.0] + [210.0 + 15.0 * i for i in range(1, 30)]
    plain = gaps(simulate(arrivals, ControllerConfig(tau_ms=20, tau_max_ms=45)))
    assert plain[0] == pytest.approx(110.0)  # shown on arrival: one long gap
    held = simulate(arrivals, ControllerConfig(tau_ms=20, tau_max_ms=45, first_hold_ms=300))
    assert held[0] == pytest.approx(210.0)  # t1 waits for t2: TTFT pays the gap seen ...
    assert 20.0 <= held[1] - held[0] <= 45.0  # ... t2 follows one pace later
    assert max(gaps(held)) <= 45.0 + 1e-9  # no displayed gap exceeds the bound
    capped = simulate(arrivals, ControllerConfig(tau_ms=20, tau_max_ms=45, first_hold_ms=80))
    assert capped[0] == pytest.approx(180.0)  # the cap: t2 came later than planned
    with pytest.raises(ValueError):
        ControllerConfig(first_hold_ms=-1)


def test_a_held_single_token_answer_is_shown_when_the_stream_ends() -> None:
    ctl = SpeedController(ControllerConfig(first_hold_ms=500))
    ctl.push(7, 100.0)
    assert ctl.next_release() == 600.0  # waiting for a second token
    ctl.end()
    assert ctl.pop_due(101.0) == [(7, 100.0)]
