"""The discrete-event simulator drives the live policy code: invariants and the paper's
mechanisms, deterministically (virtual time, so no wall-clock assertions)."""

from __future__ import annotations

import json
import math

import pytest

from bench.simulator import SIM_POLICIES, SimConfig, SimRequest, Simulator
from bench.traces import paper_example
from services.engine.mock import LatencyModel
from services.model.profile import profile_path

pytestmark = pytest.mark.unit
LAT = LatencyModel.from_profile(json.loads(profile_path("scaled-gpu").read_text()))


def _mixed(n: int) -> list[SimRequest]:
    lens = [128, 7000, 900, 3000, 200, 12000, 450, 60]
    return [SimRequest(i * 9.0, lens[i % len(lens)], 5 + i % 30, i % 2) for i in range(n)]


@pytest.mark.parametrize("policy", SIM_POLICIES)
@pytest.mark.parametrize("closed", [0, 24])
def test_every_request_ends_once_and_slots_are_never_overbooked(policy: str,
                                                                closed: int) -> None:
    sim = Simulator(SimConfig(policy, gateways=3), LAT)
    res = sim.run(_mixed(400), closed_users=closed)
    assert len(res) == 400  # conservation: each ended exactly once (a second end raises)
    assert sim.max_busy_seen <= sim.cfg.slots
    assert all(p.busy == 0 and not p.fifo for ps in sim.prefills.values() for p in ps)
    assert all(not q for q in sim.fwdq.values())
    assert all(v == 0 for c in sim.open_streams for v in c.values())  # no stream leaked
    assert all(r.ok == (not math.isnan(r.ttft_ms)) for r in res)


def test_runs_are_deterministic() -> None:
    a = Simulator(SimConfig("forward"), LAT).run(_mixed(300), closed_users=16)
    b = Simulator(SimConfig("forward"), LAT).run(_mixed(300), closed_users=16)
    assert a == b


def _paper(policy: str) -> tuple[float, list[float]]:
    reqs = [SimRequest(r.arrival_s * 1e3, r.prompt_len, r.output_len, 0)
            for r in paper_example(bursts=1)]
    res = Simulator(SimConfig(policy, groups=1, prefills_per_group=2, slo_factor=100), LAT
                    ).run(reqs)
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


def test_predictive_early_intervention_prevents_the_overload_collapse() -> None:
    reqs = [SimRequest(0.0, r.prompt_len, r.output_len, r.group) for r in _mixed(1500)]

    def rate(predictive: bool) -> float:
        res = Simulator(SimConfig("forward", predictive=predictive), LAT).run(
            reqs, closed_users=160)
        return sum(r.slo_met for r in res) / len(res)

    assert rate(True) > rate(False) + 0.1
