"""The prefill scheduling policies and the forwarding queue's order."""

from __future__ import annotations

import pytest

from services.gateway.policy import Candidate
from services.gateway.scheduling import (
    BatchFiller,
    Load,
    Policy,
    Waiting,
    may_retry,
    prefill_order,
    queue_order,
    split_expired,
)

pytestmark = pytest.mark.unit
P = [Candidate("p0", 1), Candidate("p1", 1), Candidate("p2", 1)]


def ids(cands: list[Candidate]) -> list[str]:
    return [c.instance_id for c in cands]


def test_forward_tries_every_prefill_fewest_streams_first() -> None:
    order = prefill_order(Policy.FORWARD, "g", P, {"p0": 3, "p1": 0, "p2": 1}, tick=0)
    assert ids(order) == ["p1", "p2", "p0"]


def test_forward_excludes_prefills_that_already_rejected_this_round() -> None:
    order = prefill_order(Policy.FORWARD, "g", P, {}, 0, exclude=frozenset({"p0", "p2"}))
    assert ids(order) == ["p1"]
    assert prefill_order(Policy.FORWARD, "g", P, {}, 0, exclude=frozenset(ids(P))) == []


def test_batch_filling_keeps_the_accepting_prefill_first_until_it_rejects() -> None:
    filler = BatchFiller()
    filler.on_accept("g", "p2")
    busy = {"p2": 2}  # even with more streams open, the filling prefill is asked first
    assert ids(prefill_order(Policy.FORWARD, "g", P, busy, 0, filler))[0] == "p2"
    assert ids(prefill_order(Policy.FORWARD, "other", P, busy, 0, filler))[0] != "p2"
    filler.on_reject("g", "p2")
    assert ids(prefill_order(Policy.FORWARD, "g", P, busy, 0, filler))[-1] == "p2"
    filler.on_reject("g", "p0")  # rejecting a non-filling prefill changes nothing
    assert filler.filling == {}


def test_round_robin_cycles_through_all_prefills() -> None:
    picks = [ids(prefill_order(Policy.RR_QUEUE, "g", P, {}, t))[0] for t in range(6)]
    assert picks == ["p0", "p1", "p2", "p0", "p1", "p2"]


def test_queueing_policies_pick_exactly_one() -> None:
    for policy in (Policy.RR_QUEUE, Policy.LOS_QUEUE, Policy.REPORTED_QUEUE):
        assert len(prefill_order(policy, "g", P, {}, 5)) == 1
    assert not Policy.LOS_QUEUE.rejects and Policy.FORWARD.rejects


def test_least_open_streams_with_local_queue() -> None:
    order = prefill_order(Policy.LOS_QUEUE, "g", P, {"p0": 2, "p1": 1, "p2": 4}, 0)
    assert ids(order) == ["p1"]


def test_reported_queue_uses_load_per_slot() -> None:
    loads = {"p0": Load(busy=1, queued=3, slots=1), "p1": Load(busy=2, queued=0, slots=4),
             "p2": Load(busy=1, queued=1, slots=1)}
    assert ids(prefill_order(Policy.REPORTED_QUEUE, "g", P, {}, 0, loads=loads)) == ["p1"]


def test_reported_queue_is_blind_to_what_happened_since_the_report() -> None:
    # The paper's point: a stale report sends a burst to the same "idle" prefill.
    loads = {"p0": Load(0, 0, 1), "p1": Load(1, 0, 1), "p2": Load(1, 0, 1)}
    picks = {ids(prefill_order(Policy.REPORTED_QUEUE, "g", P, {"p0": 5}, t, loads=loads))[0]
             for t in range(4)}
    assert picks == {"p0"}


def test_queue_is_earliest_deadline_first_with_a_stable_tie_break() -> None:
    entries = [Waiting("b", "g1", 300), Waiting("a", "g2", 300), Waiting("c", "g1", 100)]
    assert [e.request_id for e in queue_order(entries)] == ["c", "a", "b"]


def test_expired_entries_are_split_off() -> None:
    entries = [Waiting("late", "g", 90), Waiting("ok", "g", 200), Waiting("now", "g", 100)]
    live, expired = split_expired(entries, now_ms=100)
    assert [e.request_id for e in live] == ["ok"]
    assert [e.request_id for e in expired] == ["late", "now"]


@pytest.mark.parametrize(("rank", "prefills", "expected"), [
    (0, 2, True), (1, 2, True), (2, 2, False), (None, 4, False), (0, 0, True),
])
def test_only_the_head_of_the_queue_probes(rank: int | None, prefills: int,
                                           expected: bool) -> None:
    assert may_retry(rank, prefills) is expected


def test_only_the_old_design_counts_streams_over_their_whole_lifetime() -> None:
    assert Policy.LOS_QUEUE.lifetime_streams
    assert not any(p.lifetime_streams for p in Policy if p is not Policy.LOS_QUEUE)
