"""Eq. 1: Φ, the bottleneck, the best integer split, profiles from latency models."""

from __future__ import annotations

import math

import pytest

from services.control.perfmodel import (
    DECODE,
    PREFILL,
    TRAFFIC,
    Deployment,
    GroupProfile,
    LiveEstimate,
    Workload,
    allocate,
    best_split,
    effective_b_d,
    from_latency,
    min_per_role,
    required,
    sweep,
)
from services.engine.mock import LatencyModel

pytestmark = pytest.mark.unit

LAT = LatencyModel(a=15.0, b=0.05, c=1.5e-6, d0=12.0, d1=0.25, d2=2e-5)


def prof(**kw: float) -> GroupProfile:
    base = {"ttft_bs_ms": 100.0, "tpot_bs_ms": 20.0, "b_p": 1, "b_d": 16, "g": 99.0}
    return GroupProfile(**{**base, **kw})  # type: ignore[arg-type]


def test_formulas_match_the_paper() -> None:
    p = prof(r_pre=0.5, xi_ms=10.0)
    assert p.t_p_ms == 50.0  # TTFT_bs * r_pre
    assert p.t_d_ms == 10.0 + 20.0 * 99  # xi + TPOT_bs * G
    assert p.prefill_rate(2) == pytest.approx(2 * 1 * 1000 / 50.0)
    assert p.decode_rate(3) == pytest.approx(3 * 16 * 1000 / p.t_d_ms)
    cap = min(p.prefill_rate(2), p.decode_rate(3))
    assert p.phi(2, 3) == pytest.approx(cap / 5)
    assert p.phi(2, 3, traffic=1.0) == pytest.approx(1.0 / 5)  # traffic-bound


def test_bottleneck_names_the_weaker_role_or_traffic() -> None:
    p = prof()
    assert p.bottleneck(1, 10) == PREFILL
    assert p.bottleneck(10, 1) == DECODE
    assert p.bottleneck(5, 5, traffic=0.5) == TRAFFIC


def test_best_split_balances_the_roles_and_is_the_integer_optimum() -> None:
    p = prof()
    for total in range(4, 40):
        best = best_split(p, total)
        brute = max(sweep(p, total, floor=2), key=lambda s: s.capacity)
        assert best.capacity == pytest.approx(brute.capacity)
        # Eq. 1: the continuous ratio lies between the best split's neighbours.
        assert best.n_p - 1 <= p.eq1_ratio() * best.n_d * (1 + 1e-9) + 1


def test_best_split_keeps_two_of_each_role() -> None:
    p = prof(ttft_bs_ms=1.0)  # prefill is nearly free: Eq. 1 alone would give it 0-1
    s = best_split(p, 10)
    assert s.n_p == 2 and s.n_d == 8
    assert min_per_role(3) == 1 and min_per_role(4) == 2
    assert best_split(p, 3).n_p == 1  # a 3-instance group cannot avoid a single point


def test_longer_answers_move_the_optimum_toward_decode() -> None:
    p = prof()
    short, long_ = best_split(p, 16), best_split(p.with_workload(g=2 * p.g), 16)
    assert long_.n_d > short.n_d
    assert p.with_workload(g=2 * p.g).ttft_share < p.ttft_share


def test_required_carries_the_traffic() -> None:
    p = prof()
    need = required(p, traffic=50.0)
    assert need.capacity >= 50.0
    assert p.capacity(need.n_p - 1, need.n_d) < 50.0 or need.n_p == 2
    assert p.capacity(need.n_p, need.n_d - 1) < 50.0 or need.n_d == 2


def test_allocate_shares_a_fixed_total_by_served_fraction() -> None:
    hot, cold = prof(), prof()
    out = allocate({"hot": (hot, 60.0), "cold": (cold, 10.0)}, 24)
    assert sum(s.total for s in out.values()) == 24
    assert out["hot"].total > out["cold"].total
    assert min(out["cold"].n_p, out["cold"].n_d, out["hot"].n_p, out["hot"].n_d) >= 2
    with pytest.raises(ValueError):
        allocate({"a": (hot, 1.0), "b": (cold, 1.0)}, 7)


def test_profile_from_the_mock_latency_model() -> None:
    wl = Workload.from_requests(LAT, [(2000, 30), (1000, 10)])
    assert wl.prefill_ms == pytest.approx((LAT.prefill_ms(2000) + LAT.prefill_ms(1000)) / 2)
    assert wl.output_len == 20
    p = from_latency(LAT, wl, Deployment(decode_slots=64))
    assert p.b_d == 64 and p.g == 19
    assert p.tpot_bs_ms == pytest.approx(LAT.step_ms([round(wl.decode_ctx)] * 64))
    assert p.xi_ms == pytest.approx(1500 * 12 * 1024 / 10e6)
    # A serial prefill (one model thread) with 2 slots takes twice as long per batch.
    serial = from_latency(LAT, wl, Deployment(prefill_slots=2, prefill_parallel=False))
    assert serial.prefill_rate(1) == pytest.approx(2000 / (2 * wl.prefill_ms + serial.hold_ms))


def test_prefix_hits_set_r_pre() -> None:
    wl = Workload.from_requests(LAT, [(4096, 10)], cached=[2048])
    p = from_latency(LAT, wl, Deployment())
    assert p.r_pre == pytest.approx(LAT.prefill_ms(4096, 2048) / LAT.prefill_ms(4096))
    assert p.t_p_ms == pytest.approx(LAT.prefill_ms(4096, 2048))


def test_kv_room_and_tpot_slo_bound_the_decode_batch() -> None:
    wl = Workload.from_requests(LAT, [(3000, 1000)])
    assert effective_b_d(LAT, wl, Deployment(decode_slots=64, kv_pool_tokens=40_000)) == 10
    slo = LAT.step_ms([round(wl.decode_ctx)] * 8) + 0.01
    assert effective_b_d(LAT, wl, Deployment(decode_slots=64, tpot_slo_ms=slo)) == 8


def test_decode_heavy_mix_has_an_interior_optimum() -> None:
    wl = Workload.from_requests(LAT, [(1500, 200)] * 4)  # chat-length answers
    p = from_latency(LAT, wl, Deployment(decode_slots=16, kv_pool_tokens=32_768))
    best = best_split(p, 12)
    assert 2 < best.n_p < 10


def test_live_estimate_fits_tpot_against_batch() -> None:
    est = LiveEstimate(alpha=0.2)
    assert est.profile(1, 16) is None
    for i in range(40):
        b = 1 + i % 8
        est.observe(prefill_ms=100.0, xi_ms=2.0, tpot_ms=10.0 + 0.5 * b, out_tokens=50,
                    decode_batch=b)
    assert est.tpot_at(16) == pytest.approx(18.0, rel=1e-6)
    p = est.profile(b_p=1, b_d=16)
    assert p is not None and p.g == pytest.approx(49)
    assert p.t_d_ms == pytest.approx(2.0 + 18.0 * 49)


def test_prefill_headroom_moves_the_optimum_toward_prefill() -> None:
    p = prof()
    tight = p.with_prefill_util(0.7)
    assert tight.capacity(4, 4) == pytest.approx(min(0.7 * p.prefill_rate(4), p.decode_rate(4)))
    assert best_split(tight, 16).n_p >= best_split(p, 16).n_p
    assert tight.eq1_ratio() == pytest.approx(p.eq1_ratio() / 0.7)


def test_bad_profiles_are_refused() -> None:
    for kw in ({"ttft_bs_ms": 0.0}, {"b_d": 0}, {"r_pre": 1.5}, {"g": -1.0}, {"u_p": 0.0}):
        with pytest.raises(ValueError):
            prof(**kw)
    with pytest.raises(ValueError):
        best_split(prof(), 1)
    assert math.isinf(prof().phi(1, 1, traffic=math.inf)) is False


def test_pdserve_plan_prints_each_groups_best_split(capsys: pytest.CaptureFixture[str]) -> None:
    import json as _json

    from services.cli import build_parser
    from services.control.plan_cli import prefix_hits, read_trace, run

    args = build_parser().parse_args(["plan", "--group", "chat:prompt=1500,output=200,rate=8",
                                      "--group", "code:prompt=2000,output=30", "--json"])
    assert run(args) == 0
    out = _json.loads(capsys.readouterr().out)
    assert [g["group"] for g in out] == ["chat", "code"]
    chat, code = out
    assert chat["best"]["n_d"] > code["best"]["n_d"]  # longer answers need more decode
    assert chat["needed"]["capacity"] >= 8.0 and code["needed"] is None
    bad = build_parser().parse_args(["plan", "--group", "x:prompt=1"])
    assert run(bad) == 2
    from bench.traces import MOONCAKE

    reqs = read_trace(str(MOONCAKE))[:200]
    hits = prefix_hits(reqs)
    assert any(hits) and all(h < r.prompt_len for h, r in zip(hits, reqs, strict=True))
