"""Settings optimiser against brute force, and its constraints one by one."""

from __future__ import annotations

import random

import pytest

from services.device.optimizer import (
    Constraints,
    Curve,
    Profiles,
    brute_force,
    choose,
    feasible,
)

QUALITY = {1.0: 1.0, 0.75: 0.9, 0.5: 0.7, 0.25: 0.4}


def profiles(rng: random.Random) -> Profiles:
    return Profiles(
        device_prefill=Curve(((0.0, rng.uniform(10, 80)), (1024.0, rng.uniform(200, 3000)),
                              (4096.0, rng.uniform(3000, 16000)))),
        device_tpot_ms=rng.uniform(15, 60),
        cloud_ttft=Curve.linear(rng.uniform(20, 60), rng.uniform(0.02, 0.2)),
        cloud_tpot_ms=rng.uniform(5, 35),
        rtt_ms=rng.uniform(10, 150),
        chunk_tokens=rng.choice([64, 256]),
        # Half the cases have a cloud t1 -> t2 gap large enough to need a first-token hold.
        cloud_t2_gap=rng.choice([None, Curve.linear(rng.uniform(10, 60), rng.uniform(0, 0.03))]),
    )


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    p = profiles(rng)
    c = Constraints(ttft_target_ms=rng.uniform(200, 2000), tpot_max_ms=rng.uniform(30, 80),
                    min_quality=rng.choice([0.0, 0.6, 0.85]), quality=QUALITY)
    n, out = rng.choice([256, 1024, 2048, 4096]), rng.randint(8, 160)
    plan = choose(p, c, n, out)
    # A grid plus both ends of the allowed range (the optimiser's tau is exact).
    lo = max(c.tau_min_ms, p.cloud_tpot_ms * (1 + p.jitter))
    taus = sorted({lo, c.tpot_max_ms, *(c.tau_min_ms + 2.0 * i for i in range(40))})
    bf = brute_force(p, c, n, out, taus)
    if bf is None:
        assert plan.mode != "pd_device"
        return
    assert plan.mode == "pd_device"
    assert feasible(p, c, n, out, plan.rho, plan.k, plan.tau_ms)
    assert plan.cloud_ms == pytest.approx(bf.cloud_ms)
    assert plan.n_budget == bf.n_budget
    assert plan.tau_ms <= bf.tau_ms + 1e-9  # exact tau vs a grid


def example() -> Profiles:
    return Profiles(device_prefill=Curve.linear(20, 1.0), device_tpot_ms=30,
                    cloud_ttft=Curve.linear(30, 0.05), cloud_tpot_ms=15, rtt_ms=50)


def test_refinement_chosen_only_when_quality_allows() -> None:
    p = example()
    loose = choose(p, Constraints(quality=QUALITY, min_quality=0.0), 2048, 256)
    strict = choose(p, Constraints(quality=QUALITY, min_quality=0.95), 2048, 256)
    assert loose.mode == strict.mode == "pd_device"
    assert strict.rho == 1.0
    assert loose.cloud_ms <= strict.cloud_ms


def test_ttft_target_unreachable_by_cloud_falls_back_to_device() -> None:
    # 20 tokens: the device's own prefill (40 ms) beats the cloud's first token (81 ms).
    plan = choose(example(), Constraints(ttft_target_ms=10), 20, 256)
    assert plan.mode == "device_only"
    assert plan.reason


def test_device_too_slow_to_decode_falls_back_to_cloud() -> None:
    p = example()
    plan = choose(p, Constraints(tpot_max_ms=25), 2048, 256)  # t_dev = 30 > 25
    assert plan.mode == "cloud_only"
    assert plan.n_budget == 256


def test_no_stall_constraints_hold_for_the_plan() -> None:
    p = example()
    plan = choose(p, Constraints(), 1024, 512)
    a1 = p.first_arrival_ms(1024)
    assert plan.tau_ms >= p.cloud_tpot_ms * (1 + p.jitter)
    assert p.device_ready_ms(1024, plan.rho, plan.k) <= a1 + plan.k * plan.tau_ms + 1e-9
    assert not feasible(p, Constraints(), 1024, 512, plan.rho, plan.k - 1, 50.0)


def test_curve_interpolates_and_extrapolates() -> None:
    c = Curve(((0.0, 10.0), (100.0, 110.0), (200.0, 310.0)))
    assert c(50) == 60.0
    assert c(150) == 210.0
    assert c(300) == 510.0
    with pytest.raises(ValueError):
        Curve(((1.0, 1.0), (1.0, 2.0)))


def test_first_token_hold_covers_the_clouds_t2_gap() -> None:
    # The cloud's t1 -> t2 gap: 20 ms + 0.02 ms/token (~102 ms at 4k tokens).
    p = Profiles(device_prefill=Curve.linear(20, 1.0), device_tpot_ms=30,
                 cloud_ttft=Curve.linear(30, 0.05), cloud_tpot_ms=15, rtt_ms=50,
                 cloud_t2_gap=Curve.linear(20, 0.02))
    c = Constraints(ttft_target_ms=1500, tpot_max_ms=45)
    assert p.hold_ms(256, 45) == 0.0  # a short prompt's gap is under the bound already
    hold = p.hold_ms(4096, 45)
    assert hold == pytest.approx(2 * 1.5 * 101.92)  # the cap: 3x the expected gap
    short = choose(p, c, 4096, 8)  # no hand-off fits in 8 tokens: the cloud serves it
    assert short.mode == "cloud_only" and short.hold_ms == pytest.approx(hold)
    assert short.ttft_ms == pytest.approx(p.first_arrival_ms(4096) + hold / 2)  # expected
    long = choose(p, c, 4096, 400)
    assert long.mode == "pd_device" and long.hold_ms == pytest.approx(hold)
    # The display may start as early as t1's arrival: the device gets no credit for it.
    no_gap = choose(Profiles(**{**p.__dict__, "cloud_t2_gap": None}), c, 4096, 400)
    assert (long.k, long.tau_ms) == (no_gap.k, no_gap.tau_ms)
    # An expected hold that breaks the TTFT target rules the hand-off out; the cloud alone
    # still shows the first token long before the device's own 4k prefill would.
    tight = Constraints(ttft_target_ms=p.first_arrival_ms(4096) + hold / 2 - 1,
                        tpot_max_ms=45)
    assert choose(p, tight, 4096, 400).mode == "cloud_only"


def test_a_slow_cloud_still_beats_a_much_slower_device() -> None:
    # The cloud misses a 100 ms TTFT target (~180 ms), but the device alone would take 2 s.
    p = example()
    c = Constraints(ttft_target_ms=100, tpot_max_ms=45)
    assert p.first_arrival_ms(2000) > 100
    plan = choose(p, c, 2000, 16)
    assert plan.mode == "cloud_only"
    # A short prompt the device prefills sooner than the cloud answers: device_only.
    assert choose(p, Constraints(ttft_target_ms=50, tpot_max_ms=45), 20, 16).mode \
        == "device_only"
