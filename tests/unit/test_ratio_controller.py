"""The online ratio controller (§1.3) and its plans: direction from the TTFT share,
gradual and hysteretic changes, no single point of failure, fixed total and spare pool,
idempotent plans that a successor can finish or undo."""

from __future__ import annotations

import pytest

from services.control.actuator import (
    Capabilities,
    Decision,
    InstanceStatus,
    Kind,
    Plan,
    State,
    Step,
    StepKind,
    impossible,
    plan_for,
    satisfied,
)
from services.control.controller import (
    ControllerConfig,
    FleetView,
    GroupView,
    Member,
    Obs,
    RatioController,
)
from services.control.perfmodel import GroupProfile, best_split, required

pytestmark = pytest.mark.unit


def group(name: str, n_p: int, n_d: int, e2e: float, share: float, requests: int = 100,
          failed: int = 0, profile: GroupProfile | None = None, changing: int = 0,
          rps: float = 10.0) -> GroupView:
    return GroupView(name, Obs(requests, failed, e2e, share, rps),
                     tuple(Member(f"{name}-p{i}", in_flight=i) for i in range(n_p)),
                     tuple(Member(f"{name}-d{i}", in_flight=i) for i in range(n_d)),
                     changing, profile)


def run(c: RatioController, *groups: GroupView, spares: tuple[str, ...] = ()) -> list[Decision]:
    return c.decide(FleetView(tuple(groups), spares))


def test_calm_group_gets_no_change() -> None:
    c = RatioController(ControllerConfig(warmup=0))
    for e2e in (1000, 1050, 980, 1100, 1020):
        assert run(c, group("g", 4, 4, e2e, 0.3)) == []


def test_e2e_up_with_share_up_adds_prefill_from_decode() -> None:
    c = RatioController(ControllerConfig(warmup=0))
    run(c, group("g", 4, 4, 1000, 0.30))
    out = run(c, group("g", 4, 4, 1500, 0.50))
    assert len(out) == 1 and out[0].kind is Kind.SWITCH
    assert out[0].role == "prefill" and out[0].from_role == "decode"
    assert out[0].instance_id == "g-d0"  # the quietest decode drains first


def test_e2e_up_with_share_down_adds_decode() -> None:
    c = RatioController(ControllerConfig(warmup=0))
    run(c, group("g", 4, 4, 1000, 0.30))
    out = run(c, group("g", 4, 4, 1500, 0.15))
    assert [(d.role, d.from_role) for d in out] == [("decode", "prefill")]


def test_the_first_periods_only_take_the_reference() -> None:
    c = RatioController(ControllerConfig(warmup=2))
    assert run(c, group("g", 4, 4, 500, 0.30)) == []  # an empty group filling up
    assert run(c, group("g", 4, 4, 1000, 0.30)) == []  # still warming up: no trigger
    assert run(c, group("g", 4, 4, 1050, 0.30)) == []  # the reference is 1000 now
    assert run(c, group("g", 4, 4, 1500, 0.50))


def test_a_loss_the_model_backs_is_kept() -> None:
    prof = GroupProfile(ttft_bs_ms=100, tpot_bs_ms=20, b_p=1, b_d=16, g=100)
    c = RatioController(ControllerConfig(cooldown=0, warmup=0))
    rps = prof.capacity(13, 3)  # saturated: no headroom
    run(c, group("g", 13, 3, 1000, 0.3, profile=prof, rps=rps))
    assert run(c, group("g", 13, 3, 2000, 0.1, profile=prof, rps=rps))  # +4 decode (capped)
    # E2E still rising (the overload's backlog), but Eq. 1 says 9:7 beats 10:6: keep.
    assert run(c, group("g", 9, 7, 3000, 0.1, profile=prof, rps=rps)) == []
    assert "model backs" in c.state["g"].last


def test_small_rises_and_too_few_requests_are_not_evidence() -> None:
    c = RatioController(ControllerConfig(warmup=0))
    run(c, group("g", 4, 4, 1000, 0.30))
    assert run(c, group("g", 4, 4, 1100, 0.50)) == []  # +10% < e2e_up
    assert run(c, group("g", 4, 4, 3000, 0.90, requests=5)) == []


def test_failures_count_as_prefill_pressure() -> None:
    c = RatioController(ControllerConfig(warmup=0))
    run(c, group("g", 4, 4, 1000, 0.30))
    out = run(c, group("g", 4, 4, 1000, 0.30, failed=20))
    assert [d.role for d in out] == ["prefill"]


def test_no_action_while_a_change_is_under_way_or_cooling_down() -> None:
    c = RatioController(ControllerConfig(cooldown=2, warmup=0))
    run(c, group("g", 4, 4, 1000, 0.30))
    assert run(c, group("g", 4, 4, 1500, 0.50))
    assert run(c, group("g", 5, 3, 1500, 0.50, changing=1)) == []
    assert run(c, group("g", 5, 3, 1500, 0.50)) == []  # cooldown 2
    assert run(c, group("g", 5, 3, 1500, 0.50)) == []


def test_a_role_never_drops_below_two() -> None:
    c = RatioController(ControllerConfig(warmup=0))
    run(c, group("g", 6, 2, 1000, 0.30))
    assert run(c, group("g", 6, 2, 3000, 0.60)) == []  # wants prefill; decode is at 2
    c2 = RatioController(ControllerConfig(warmup=0))
    run(c2, group("s", 2, 1, 1000, 0.30))
    assert run(c2, group("s", 2, 1, 3000, 0.10)) == []  # prefill at 2, decode at 1


def test_model_sizes_the_step_and_caps_it() -> None:
    prof = GroupProfile(ttft_bs_ms=100, tpot_bs_ms=20, b_p=1, b_d=16, g=100)
    best = best_split(prof, 16)
    c = RatioController(ControllerConfig(max_step_frac=0.25, warmup=0))
    rps = prof.capacity(13, 3)
    start = group("g", 13, 3, 1000, 0.5, profile=prof, rps=rps)
    run(c, start)
    out = run(c, group("g", 13, 3, 2000, 0.2, profile=prof, rps=rps))
    assert best.n_p < 13 - 4  # far away: the step is capped at 25% of 16
    assert len(out) == 4 and all(d.role == "decode" for d in out)


def test_hill_climb_continues_while_it_helps_and_reverts_a_loss() -> None:
    c = RatioController(ControllerConfig(cooldown=0, warmup=0))
    run(c, group("g", 4, 6, 1000, 0.3))
    assert [d.role for d in run(c, group("g", 4, 6, 1600, 0.5))] == ["prefill"]
    # It helped (-25%): one more prefill.
    assert [d.role for d in run(c, group("g", 5, 5, 1200, 0.45))] == ["prefill"]
    # The next one hurt (+30%): revert it, then hold against weak triggers.
    assert [d.role for d in run(c, group("g", 6, 4, 1560, 0.2))] == ["decode"]
    assert run(c, group("g", 5, 5, 1200, 0.4)) == []  # judged: the new normal
    assert run(c, group("g", 5, 5, 1450, 0.55)) == []  # +21%: under the hold's 2x bar


def test_fixed_total_moves_from_a_calm_donor_when_the_group_cannot_switch() -> None:
    c = RatioController(ControllerConfig(warmup=0))
    run(c, group("hot", 2, 2, 1000, 0.3), group("cold", 4, 4, 800, 0.3))
    out = run(c, group("hot", 2, 2, 2000, 0.1), group("cold", 4, 4, 800, 0.3))
    assert len(out) == 1 and out[0].kind is Kind.MOVE
    assert out[0].group == "hot" and out[0].role == "decode" and out[0].from_group == "cold"


def test_a_group_short_of_instances_takes_donors_before_rebalancing() -> None:
    prof = GroupProfile(ttft_bs_ms=100, tpot_bs_ms=20, b_p=1, b_d=16, g=100)
    c = RatioController(ControllerConfig(warmup=0))
    hot_rate = 1.5 * best_split(prof, 8).capacity  # no split of 8 carries it
    hot = dict(profile=prof, rps=hot_rate)
    cold = dict(profile=prof, rps=1.0)
    # Eq. 1's own trigger: no E2E rise needed, each role's deficit, donors first.
    out = run(c, group("hot", 4, 4, 1000, 0.3, **hot), group("cold", 4, 6, 800, 0.3, **cold))
    assert out and all(d.kind is Kind.MOVE and d.from_group == "cold" for d in out)
    need = required(prof, hot_rate)
    short = {r for r, n, have in (("prefill", need.n_p, 4), ("decode", need.n_d, 4)) if n > have}
    assert {d.role for d in out} == short
    assert len(out) <= 2 * max(1, int(0.25 * 8))


def test_a_rise_with_modelled_headroom_is_the_workloads_own() -> None:
    prof = GroupProfile(ttft_bs_ms=100, tpot_bs_ms=20, b_p=1, b_d=16, g=100)
    c = RatioController(ControllerConfig(warmup=0))
    light = prof.capacity(4, 4) / 2
    run(c, group("g", 4, 4, 1000, 0.3, profile=prof, rps=light))
    assert run(c, group("g", 4, 4, 2000, 0.1, profile=prof, rps=light)) == []
    assert "headroom" in c.state["g"].last


def test_short_confirm_waits_for_a_deficit_to_persist() -> None:
    prof = GroupProfile(ttft_bs_ms=100, tpot_bs_ms=20, b_p=1, b_d=16, g=100)
    c = RatioController(ControllerConfig(warmup=0, short_confirm=2))
    hot = dict(profile=prof, rps=1.5 * best_split(prof, 8).capacity)
    cold = dict(profile=prof, rps=1.0)
    assert run(c, group("hot", 4, 4, 1000, 0.3, **hot), group("cold", 4, 6, 800, 0.3, **cold)) == []
    assert run(c, group("hot", 4, 4, 1000, 0.3, **hot), group("cold", 4, 6, 800, 0.3, **cold))


def test_a_donor_keeps_headroom_over_its_traffic() -> None:
    prof = GroupProfile(ttft_bs_ms=100, tpot_bs_ms=20, b_p=1, b_d=16, g=100)
    c = RatioController(ControllerConfig(warmup=0))
    busy = prof.capacity(3, 4)  # the donor's traffic equals its capacity minus one
    run(c, group("hot", 2, 2, 1000, 0.3), group("cold", 4, 4, 800, 0.3, profile=prof,
                                                  rps=busy))
    out = run(c, group("hot", 2, 2, 2000, 0.1), group("cold", 4, 4, 800, 0.3, profile=prof,
                                                       rps=busy))
    assert out == []


def test_spare_pool_borrows_then_releases_when_calm() -> None:
    cfg = ControllerConfig(spare=True, release_after=2, cooldown=0, warmup=0)
    c = RatioController(cfg)
    run(c, group("g", 2, 2, 1000, 0.3), spares=("s1", "s2"))
    out = run(c, group("g", 2, 2, 2000, 0.6), spares=("s1", "s2"))
    assert [(d.kind, d.instance_id, d.role) for d in out] == [(Kind.BORROW, "s1", "prefill")]
    g = GroupView("g", Obs(100, 0, 1000, 0.3, 10.0, prefill_busy=0.2, decode_busy=0.6),
                  tuple(Member(f"p{i}") for i in range(3)), tuple(Member(f"d{i}") for i in
                                                               range(2)))
    assert run(c, g) == []  # judged: settled
    assert run(c, g) == []  # calm 1
    rel = run(c, g)  # calm 2: release the borrowed prefill
    assert [(d.kind, d.role) for d in rel] == [(Kind.RELEASE, "prefill")]


def test_state_survives_a_leader_change() -> None:
    c = RatioController(ControllerConfig(warmup=0))
    run(c, group("g", 4, 4, 1000, 0.30))
    run(c, group("g", 4, 4, 1500, 0.50))
    c2 = RatioController(ControllerConfig(warmup=0))
    c2.restore(c.snapshot())
    assert c2.snapshot() == c.snapshot()


class Plant:
    """A closed loop of ``users`` on Eq. 1's model: the bottleneck role queues."""

    def __init__(self, prof: GroupProfile, users: int) -> None:
        self.prof, self.users = prof, users

    def observe(self, n_p: int, n_d: int) -> tuple[float, float, float]:
        p = self.prof
        x = min(p.capacity(n_p, n_d), self.users * 1000.0 / p.e2e_ms)
        e2e = self.users * 1000.0 / x
        wait = e2e - p.e2e_ms
        pre = p.t_p_ms + (wait if p.prefill_rate(n_p) <= p.decode_rate(n_d) else 0.0)
        return e2e, pre / e2e, x


@pytest.mark.parametrize("model", [True, False])
def test_converges_next_to_the_best_split_and_follows_a_shift(model: bool) -> None:
    prof = GroupProfile(ttft_bs_ms=100, tpot_bs_ms=20, b_p=1, b_d=16, g=60, xi_ms=2)
    total, users = 16, 400
    c = RatioController(ControllerConfig(cooldown=0, warmup=0))
    # Without a profile only changes are seen: start that run balanced.
    n_p = 13 if model else best_split(prof, total).n_p
    history = []
    for period in range(24):
        cur = prof if period < 12 else prof.with_workload(g=3 * prof.g)
        e2e, share, x = Plant(cur, users).observe(n_p, total - n_p)
        gv = group("g", n_p, total - n_p, e2e, share, rps=x, profile=cur if model else None)
        for d in run(c, gv):
            assert d.kind is Kind.SWITCH
            n_p += 1 if d.role == "prefill" else -1
        assert 2 <= n_p <= total - 2
        history.append(n_p)
        if period in (11, 23):
            best = best_split(cur, total)
            assert cur.capacity(n_p, total - n_p) >= 0.9 * best.capacity, history
    assert history[11] > history[-1]  # moved toward decode after the shift


def test_plans_for_each_decision_and_capability() -> None:
    sw = Decision(Kind.SWITCH, "g", "decode", "i1", "g", "prefill")
    p = plan_for(sw, fence=7, plan_id="p1", caps=Capabilities())
    assert [s.kind for s in p.steps] == [StepKind.DRAIN, StepKind.ASSIGN]
    assert p.steps[1] == Step(StepKind.ASSIGN, "i1", "decode", "g")
    rel = plan_for(Decision(Kind.RELEASE, "g", "prefill", "i2"), 7, "p2", Capabilities())
    assert [s.kind for s in rel.steps] == [StepKind.DRAIN, StepKind.RELEASE]
    k8s = Capabilities(assign=False, scale=True)
    reps = {("g", "prefill"): 3, ("g", "decode"): 5}
    sp = plan_for(sw, 7, "p3", k8s, reps)
    assert [(s.role, s.replicas) for s in sp.steps] == [("prefill", 2), ("decode", 6)]
    with pytest.raises(ValueError):
        plan_for(sw, 7, "p4", k8s)


def test_steps_are_skipped_when_done_and_a_dead_instance_aborts_with_undo() -> None:
    sw = Decision(Kind.SWITCH, "g", "decode", "i1", "g", "prefill")
    plan = plan_for(sw, 3, "p", Capabilities())
    drained = InstanceStatus("i1", State.DRAINED, "prefill", "g")
    assert satisfied(plan.steps[0], drained) and not satisfied(plan.steps[1], drained)
    serving = InstanceStatus("i1", State.SERVING, "decode", "g")
    assert satisfied(plan.steps[1], serving)
    assert impossible(plan.steps[1], InstanceStatus("i1", State.GONE))
    half = plan.advance()
    assert half.pending() == plan.steps[1]
    undo = half.abort()
    assert undo.aborted and undo.steps == (Step(StepKind.ASSIGN, "i1", "prefill", "g"),)
    assert plan.advance().advance().finished and plan.advance().advance().abort().steps == ()
    assert Plan.from_json(half.to_json()) == half
