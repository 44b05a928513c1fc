"""Invariants of the simulator, BLIS-style (bench/sim/ledger.py records them):

- request conservation: admitted = finished + failed + cancelled (+ refused);
- KV conservation: transfers started = completed + aborted, on both hops; a request's
  blocks have one owner at a time and none is held at the end;
- monotonic clock and causality (arrival <= prefill <= decode <= end);
- seed determinism: the same seed gives byte-identical output; the fleet runner gives the
  same figures on 1 and 2 worker processes;
- pool exclusivity per group: an instance is in one group and one role at a time, and a
  request only uses its own group's instances, also while a controller moves them.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from bench.sim import hook
from bench.sim.fleet import FleetSpec, run_fleet
from bench.sim.model import SimConfig, SimRequest, dump_results
from bench.simulator import SIM_POLICIES, Simulator
from bench.traces import AZURE_CODE, MOONCAKE
from services.engine.mock import LatencyModel
from services.model.profile import profile_path

pytestmark = pytest.mark.unit
LAT = LatencyModel.from_profile(json.loads(profile_path("scaled-gpu").read_text()))


def _reqs(n: int, groups: int = 2, gap_ms: float = 5.0) -> list[SimRequest]:
    lens = [128, 7000, 900, 3000, 200, 12000, 450, 60, 2048]
    return [SimRequest(i * gap_ms, lens[i % len(lens)], 1 + (i * 7) % 90, i % groups,
                       tuple(range(i % 5, i % 5 + lens[i % len(lens)] // 512)))
            for i in range(n)]


def _mover(period_ms: float) -> hook.Control:
    """A controller that keeps moving one instance around: prefill <-> decode, and across
    groups, to exercise drains under load."""
    state = {"k": 0}

    def control(snaps: list[hook.GroupSnapshot]) -> list[hook.Reassign]:
        state["k"] += 1
        out = []
        src, dst = snaps[state["k"] % len(snaps)], snaps[(state["k"] + 1) % len(snaps)]
        if src.n_p > 1:
            out.append(hook.Reassign(src.prefills[-1], hook.DECODE, dst.group))
        if src.n_d > 1:
            out.append(hook.Reassign(src.decodes[0], hook.PREFILL))
        return out

    return control


CASES = [(p, closed, ctl) for p in SIM_POLICIES for closed in (0, 16) for ctl in (False, True)]


@pytest.mark.parametrize(("policy_name", "closed", "controlled"), CASES)
def test_conservation_kv_clock_causality_and_pool_exclusivity(
        policy_name: str, closed: int, controlled: bool) -> None:
    cfg = SimConfig(policy_name, groups=3, prefills_per_group=3, decodes_per_group=2,
                    decode_slots=4, gateways=2, cancel_frac=0.15, seed=7,
                    decode_pool_tokens=16384 if closed else 0,
                    control_period_ms=150.0 if controlled else 0.0, switch_ms=20.0)
    n = 700
    sim = Simulator(cfg, LAT, control=_mover(150.0) if controlled else None, audit=True)
    res = sim.run(_reqs(n, groups=3), closed_users=closed)
    audit = sim.audit
    assert audit is not None
    audit.check(n)  # raises with every violated invariant named
    # Request conservation, from the outputs too.
    st = sim.stats
    assert st.requests == n == st.ok + st.deadline + st.cancelled + st.refused
    assert sum(r.ok for r in res) == st.ok and st.cancelled > 0
    # KV conservation: every push and fetch that started ended one way or the other.
    t = audit.transfers
    assert t["push:start"] == t["push:done"] + t["push:abort"] > 0
    assert t["fetch:start"] == t["fetch:done"] + t["fetch:abort"] > 0
    assert t["fetch:done"] == st.ok + sum(1 for r in res if r.status == "cancelled"
                                          and r.decode_start_ms == r.decode_start_ms)
    # Nothing is left anywhere.
    assert sim.inflight == 0 and not audit.owner
    for g in sim.groups.values():
        assert not g.queue and not g.dwait
        assert all(p.busy == 0 and not p.fifo for p in g.prefills.values())
        assert all(d.B == 0 and d.reserved == 0 for d in g.decodes.values())
        # Every decode's KV pool blocks came back (none leaked, none freed twice).
        full = cfg.decode_pool_tokens // cfg.decode_block_tokens if cfg.decode_pool_tokens \
            else -1
        assert all(d.pool_free == full for d in g.decodes.values())
    # Pool exclusivity: a request's instances belonged to its group in that role.
    log = audit.membership_log
    for r, spec in zip(res, _reqs(n, groups=3), strict=True):
        group = f"g{spec.group}"
        for iid, role, t_used in ((r.prefill, "prefill", r.prefill_start_ms),
                                  (r.decode, "decode", r.decode_start_ms)):
            if not iid or t_used != t_used:
                continue
            joins = [e for e in log if e[1] == iid and e[4] and e[0] <= t_used]
            assert joins and joins[-1][2] == group and joins[-1][3] == role, (r, joins[-1:])
    if controlled:
        assert any(not joined for *_, joined in log)  # instances did move


def test_the_clock_check_catches_a_clock_that_goes_back() -> None:
    sim = Simulator(SimConfig("forward"), LAT, audit=True)
    sim.run(_reqs(50))
    assert sim.audit is not None
    sim.audit.clock(1.0, 2.0)
    with pytest.raises(AssertionError, match="clock went back"):
        sim.audit.check(50)


def test_the_kv_check_catches_a_leak() -> None:
    sim = Simulator(SimConfig("forward"), LAT, audit=True)
    sim.run(_reqs(50))
    assert sim.audit is not None
    sim.audit.kv_reserve(0.0, 10**6, "p")
    with pytest.raises(AssertionError, match="still hold KV"):
        sim.audit.check(50)


@pytest.mark.parametrize("policy_name", ["forward", "los-queue"])
def test_same_seed_byte_identical_output(policy_name: str) -> None:
    def run(seed: int) -> bytes:
        cfg = SimConfig(policy_name, cancel_frac=0.2, seed=seed, control_period_ms=100.0)
        sim = Simulator(cfg, LAT, control=_mover(100.0))
        return dump_results(sim.run(_reqs(500), closed_users=12))

    a, b = run(3), run(3)
    assert a == b and len(a) > 10_000
    assert run(4) != a  # the seed matters (which requests the clients cancel)


@pytest.mark.parametrize("trace", [str(AZURE_CODE), str(MOONCAKE)])
def test_fleet_runner_gives_the_same_figures_on_one_and_two_workers(trace: str) -> None:
    cfg = SimConfig("forward", groups=5, prefills_per_group=3, decodes_per_group=1,
                    cancel_frac=0.05, seed=1)
    spec = FleetSpec(cfg, trace, duration_ms=8_000.0, utilisation=0.7, workers=1)
    one = run_fleet(spec).stats
    two = run_fleet(replace(spec, workers=2, chunk_groups=2)).stats
    # Counts and histograms (percentiles) are identical; sums differ only in the order
    # the shards' floats were added.
    assert one == pytest.approx(two, rel=1e-12)
    assert all(one[k] == two[k] for k in ("requests", "ok", "deadline", "cancelled",
                                          "events", "ttft_p50_ms", "ttft_p99_ms"))
    assert one["requests"] > 100 and one["ok"] > 0


@pytest.mark.parametrize("policy_name", SIM_POLICIES)
def test_the_event_loop_makes_no_reference_cycles(policy_name: str) -> None:
    """``Simulator.loop`` turns the cyclic garbage collector off while it runs (13% of a
    fleet run went to it): that is only safe while everything a run allocates is freed by
    reference counting. A request, its events and its ends leave no cycle behind."""
    import gc

    cfg = SimConfig(policy_name, groups=3, prefills_per_group=3, decodes_per_group=2,
                    decode_slots=4, cancel_frac=0.15, seed=7, decode_pool_tokens=16384)
    sim = Simulator(cfg, LAT, keep_results=False)  # as the fleet runner does
    for g in range(3):
        sim.add_source(iter([(i, r) for i, r in enumerate(_reqs(700, groups=3))
                             if r.group == g]))
    gc.collect()
    was = gc.isenabled()
    gc.disable()
    try:
        sim.loop()
        assert sim.stats.requests == 700 and sim.stats.cancelled > 0
        assert gc.collect() == 0  # nothing the loop left behind needed the collector
    finally:
        if was:
            gc.enable()
