"""The discrete-event simulator (bench/sim) drives the live policy code: the paper's
mechanisms, the fluid decode model against stepping, the control hook, and the proof
that a change to the policy changes the live gateway and the simulator alike."""

from __future__ import annotations

import heapq
import json
import math

import pytest

from bench.sim import core, hook
from bench.sim.decode import FluidDecode
from bench.simulator import SIM_POLICIES, SimConfig, SimRequest, Simulator
from bench.traces import paper_example
from services.engine.mock import LatencyModel
from services.gateway import policy, scheduling
from services.gateway.policy import Candidate
from services.model.profile import profile_path
from services.prefill import estimator

pytestmark = pytest.mark.unit
LAT = LatencyModel.from_profile(json.loads(profile_path("scaled-gpu").read_text()))


def _mixed(n: int, gap_ms: float = 9.0) -> list[SimRequest]:
    lens = [128, 7000, 900, 3000, 200, 12000, 450, 60]
    return [SimRequest(i * gap_ms, lens[i % len(lens)], 5 + i % 30, i % 2) for i in range(n)]


@pytest.mark.parametrize("policy_name", SIM_POLICIES)
@pytest.mark.parametrize("closed", [0, 24])
def test_every_request_ends_once_and_slots_are_never_overbooked(policy_name: str,
                                                                closed: int) -> None:
    sim = Simulator(SimConfig(policy_name, gateways=3), LAT)
    res = sim.run(_mixed(400), closed_users=closed)
    assert len(res) == 400  # conservation: each ended exactly once (a second end raises)
    assert sim.max_busy_seen <= sim.cfg.slots
    assert all(p.busy == 0 and not p.fifo for ps in sim.prefills.values() for p in ps)
    assert all(not q for q in sim.fwdq.values())
    assert all(v == 0 for c in sim.open_streams for v in c.values())  # no stream leaked
    assert all(r.ok == (not math.isnan(r.ttft_ms)) for r in res)


def _paper(policy_name: str) -> tuple[float, list[float]]:
    reqs = [SimRequest(r.arrival_s * 1e3, r.prompt_len, r.output_len, 0)
            for r in paper_example(bursts=1)]
    res = Simulator(SimConfig(policy_name, groups=1, prefills_per_group=2, slo_factor=100),
                    LAT).run(reqs)
    return res[0].ttft_ms, [r.ttft_ms for r in res[1:]]


def test_paper_example_forwarding_keeps_short_prompts_off_the_long_one() -> None:
    long_ttft, shorts = _paper("forward")
    assert max(shorts) < long_ttft  # behind the long one it would start after it ends


def test_paper_example_round_robin_parks_a_short_prompt_behind_the_long_one() -> None:
    long_ttft, shorts = _paper("rr-queue")
    assert max(shorts) > long_ttft


def test_forwarding_beats_lifetime_stream_routing_under_closed_loop_load() -> None:
    reqs = [SimRequest(0.0, r.prompt_len, r.output_len, r.group) for r in _mixed(1500)]
    rate = {p: sum(r.slo_met for r in Simulator(SimConfig(p, slo_factor=8), LAT)
                   .run(reqs, closed_users=40)) / len(reqs)
            for p in ("forward", "los-queue")}
    assert rate["forward"] > rate["los-queue"] + 0.1, rate


def test_predictive_early_intervention_with_the_live_estimator_helps_past_capacity() -> None:
    reqs = [SimRequest(0.0, r.prompt_len, r.output_len, r.group) for r in _mixed(1500)]

    def rate(predictive: bool) -> float:
        res = Simulator(SimConfig("forward", predictive=predictive), LAT).run(
            reqs, closed_users=80)
        return sum(r.slo_met for r in res) / len(res)

    assert rate(True) > rate(False) + 0.1


def _stepped(joins: list[tuple[float, int, int]]) -> list[float]:
    """The mock engine's decode loop, one round at a time: (join ms, ctx0, steps) ->
    finish ms. A member joins at the first round boundary after its join time."""
    t = 0.0
    pending = sorted(range(len(joins)), key=lambda i: joins[i][0])
    active: dict[int, list[int]] = {}  # i -> [ctx, steps left]
    done = [math.nan] * len(joins)
    while pending or active:
        while pending and joins[pending[0]][0] <= t:
            i = pending.pop(0)
            active[i] = [joins[i][1], joins[i][2]]
        if not active:
            t = joins[pending[0]][0]
            continue
        t += LAT.step_ms([c for c, _ in active.values()])
        for i in list(active):
            active[i][0] += 1
            active[i][1] -= 1
            if active[i][1] == 0:
                done[i] = t
                del active[i]
    return done


def test_fluid_decode_matches_round_by_round_stepping() -> None:
    joins = [(0.0, 2000, 300), (40.0, 500, 50), (41.0, 9000, 120), (900.0, 100, 400),
             (905.0, 3000, 10), (2500.0, 64, 700)]
    want = _stepped(joins)
    d = FluidDecode("d", None, 64, LAT, 1.0)
    events: list[tuple[float, int]] = []
    got = [math.nan] * len(joins)

    class M:
        gone = False

    members = [M() for _ in joins]
    order = sorted(range(len(joins)), key=lambda i: joins[i][0])
    vjoin: dict[int, float] = {}
    for i in order:
        # finish everything due before this join
        while (t := d.next_finish_ms()) is not None and t <= joins[i][0]:
            d.advance(t)
            _, j, _ = heapq.heappop(d.heap)
            got[j] = t
            d.leave(t, joins[j][1], vjoin[j])
        d.advance(joins[i][0])
        vjoin[i] = d.V
        d.join(joins[i][0], joins[i][1], joins[i][2], i, members[i])
        events.append((joins[i][0], i))
    while (t := d.next_finish_ms()) is not None:
        d.advance(t)
        _, j, _ = heapq.heappop(d.heap)
        got[j] = t
        d.leave(t, joins[j][1], vjoin[j])
    for g, w, (t0, _, steps) in zip(got, want, joins, strict=True):
        # within one round of the stepped engine (joins wait for a round boundary)
        assert abs(g - w) <= 2 * LAT.step_ms([3000] * 6), (g, w)
        assert g > t0 + steps * LAT.d0 * 0.99


def test_control_hook_drains_then_switches_and_loses_no_request() -> None:
    seen: list[hook.GroupSnapshot] = []
    moved: list[str] = []

    def control(snaps: list[hook.GroupSnapshot]) -> list[hook.Reassign]:
        seen.extend(snaps)
        g0 = next(s for s in snaps if s.group == "g0")
        if not moved and g0.n_p > 2:
            moved.append(g0.prefills[0])
            return [hook.Reassign(g0.prefills[0], hook.DECODE),
                    hook.Reassign(g0.prefills[0], hook.DECODE)]  # twice: idempotent
        return []

    cfg = SimConfig("forward", control_period_ms=200.0, switch_ms=50.0)
    sim = Simulator(cfg, LAT, control=control, audit=True)
    res = sim.run(_mixed(600, gap_ms=4.0))
    sim.audit.check(600)
    assert len(res) == 600 and moved
    iid = moved[0]
    switched_at = next(t for t, i, g, role, joined in sim.audit.membership_log
                       if i == iid and role == "decode" and joined)
    left_at = next(t for t, i, g, role, joined in sim.audit.membership_log
                   if i == iid and role == "prefill" and not joined)
    assert switched_at >= left_at + cfg.switch_ms
    # Nothing was sent to it as a prefill after it left routing.
    assert not [r for r in res if r.prefill == iid and r.prefill_start_ms > left_at]
    assert [r for r in res if r.decode == iid]  # it served as a decode afterwards
    later = [s for s in seen if s.group == "g0" and s.now_ms > switched_at]
    assert later and later[0].n_p == cfg.prefills_per_group - 1
    assert later[0].n_d == cfg.decodes_per_group + 1
    assert all(0.0 <= s.prefill_busy <= 1.0 for s in seen)
    assert any(s.finished for s in seen)


# -- one policy core, two clocks --------------------------------------------------------
def test_the_simulator_names_the_live_policy_functions() -> None:
    mods = {"scheduling": scheduling, "policy": policy, "estimator": estimator}
    for name in core.POLICY_CORE:
        mod, _, attr = name.partition(".")
        assert callable(getattr(mods[mod], attr)), name
    # The simulator reaches them through the modules, not copies bound at import time.
    from bench.sim import sides, state

    assert core.sched is scheduling and sides.pol is policy and state.pol is policy
    assert state.est is estimator and state.sched is scheduling


def _forward_run() -> list[tuple[str, str]]:
    res = Simulator(SimConfig("forward", gateways=1), LAT).run(_mixed(300, gap_ms=6.0))
    return [(r.prefill, r.decode) for r in res]


def test_a_policy_change_changes_the_live_gateway_and_the_simulator_alike(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cands = [Candidate("a"), Candidate("b"), Candidate("c")]
    streams = {"a": 2, "b": 0, "c": 1}
    live_before = [c.instance_id for c in scheduling.prefill_order(
        scheduling.Policy.FORWARD, "g", cands, streams, 0)]
    sim_before = _forward_run()
    original = scheduling.order_ids
    calls = []

    def most_loaded_first(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        return iter(list(original(*args, **kwargs))[::-1])

    monkeypatch.setattr(scheduling, "order_ids", most_loaded_first)
    live_after = [c.instance_id for c in scheduling.prefill_order(
        scheduling.Policy.FORWARD, "g", cands, streams, 0)]
    sim_after = _forward_run()
    assert live_before == ["b", "c", "a"] and live_after == ["a", "c", "b"]
    assert sim_after != sim_before  # the simulator routed differently too
    assert len(calls) >= 300  # one live call, one per simulated TRY round


def test_a_decode_ranking_change_changes_both(monkeypatch: pytest.MonkeyPatch) -> None:
    cands = [Candidate("x", slots=4), Candidate("y", slots=4)]
    live_before = policy.rank_decodes(cands, {"x": 3, "y": 0})[0].instance_id
    sim_before = _forward_run()
    original = policy.pick_decodes
    monkeypatch.setattr(policy, "pick_decodes",
                        lambda *a: iter(list(original(*a))[::-1]))
    assert live_before == "y" and policy.rank_decodes(cands, {"x": 3, "y": 0})[0].instance_id \
        == "x"
    assert _forward_run() != sim_before


def test_the_live_estimator_decides_early_intervention_in_the_simulator(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from services.prefill import servicer

    assert servicer.PrefillEstimator is estimator.PrefillEstimator  # the live prefill's
    monkeypatch.setattr(estimator.PrefillEstimator, "lower_bound_ms",
                        lambda self, tokens: math.inf)
    res = Simulator(SimConfig("forward"), LAT).run(_mixed(50, gap_ms=50.0))
    assert not any(r.ok for r in res)  # every request "surely misses" before compute
