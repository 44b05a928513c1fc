"""The device's planner: profile file -> optimiser inputs, and the online cloud update."""

from __future__ import annotations

import pytest

from services.device.optimizer import Constraints
from services.device.planning import Planner

PROFILE = {"device": {"prefill": [[0, 40], [1024, 1300], [4096, 8000]], "tpot_ms": 35,
                      "chunk_overhead_ms": 40},
           "cloud": {"ttft": [[0, 30], [4096, 300]], "tpot_ms": 15},
           "quality": {"1.0": 1.0, "0.5": 0.9}}


def test_profile_becomes_a_plan() -> None:
    p = Planner(PROFILE, rtt_ms=50, bandwidth_mbps=20, chunk_tokens=256,
                constraints=Constraints())
    assert p.constraints.quality == {1.0: 1.0, 0.5: 0.9}
    assert p.profiles.chunk_overhead_ms == 40
    plan = p.plan(2048, 256)
    assert plan.mode == "pd_device" and plan.k >= 1 and plan.n_budget <= 256


def test_observe_moves_toward_what_requests_saw() -> None:
    p = Planner(PROFILE, rtt_ms=50, bandwidth_mbps=20, chunk_tokens=256,
                constraints=Constraints())
    before = p.profiles.first_arrival_ms(1024)
    for _ in range(20):
        p.observe(1024, first_arrival_ms=2 * before, cloud_tpot_ms=25.0)
    assert p.profiles.cloud_tpot_ms == pytest.approx(25.0, rel=0.01)
    plan_ttft = p.plan(1024, 256).ttft_ms
    assert plan_ttft > 1.5 * before  # the cloud looked slower; the plan expects it now
    p.observe(1024, 0.0, 0.0)  # nothing known: no change
    assert p.profiles.cloud_tpot_ms == pytest.approx(25.0, rel=0.01)


def test_a_device_slower_than_its_profile_gets_larger_budgets() -> None:
    p = Planner(PROFILE, rtt_ms=50, bandwidth_mbps=20, chunk_tokens=256,
                constraints=Constraints())
    before = p.plan(1024, 512)
    planned = p.profiles.device_prefill(1040) + 5 * p.profiles.chunk_overhead_ms
    for _ in range(20):  # catch-ups ran twice as long as the profile says
        p.observe_device(1040, 5, 2 * planned)
    after = p.plan(1024, 512)
    assert before.mode == after.mode == "pd_device"
    assert after.n_budget > 1.5 * before.n_budget
    p.observe_device(0, 0, 0.0)  # nothing known: no change
    assert p.plan(1024, 512) == after


def test_observe_learns_the_clouds_t2_gap_and_plans_a_hold() -> None:
    p = Planner(PROFILE, rtt_ms=50, bandwidth_mbps=20, chunk_tokens=256,
                constraints=Constraints(ttft_target_ms=1500, tpot_max_ms=45))
    assert p.profiles.cloud_t2_gap is None and p.plan(4096, 8).hold_ms == 0.0
    p.observe(4096, 400.0, 15.0, t2_gap_ms=110.0)  # the first gap seen starts the curve
    assert p.plan(4096, 8).hold_ms == pytest.approx(3 * 110)  # the cap: 3x the gap
    for _ in range(30):  # then it scales toward what later requests see
        p.observe(4096, 400.0, 15.0, t2_gap_ms=25.0)
    assert p.plan(4096, 8).hold_ms == 0.0  # 1.5 x 25 ms fits under 45 ms: no hold


def test_fleet_devices_differ_in_speed_and_link() -> None:
    from services.device.fleet import scale_profile, speed_of

    assert [speed_of(i, 5, 0.4) for i in range(5)] == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.4])
    assert speed_of(0, 1, 0.4) == 1.0
    slow = scale_profile({**PROFILE, "rtt_ms": 50}, 1.5)
    assert slow["device"]["prefill"][1] == [1024, 1950.0]
    assert slow["device"]["tpot_ms"] == 52.5 and slow["rtt_ms"] == 75.0
    assert slow["cloud"] == PROFILE["cloud"] and PROFILE["device"]["tpot_ms"] == 35
