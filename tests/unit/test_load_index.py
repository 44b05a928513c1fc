"""policy.LoadIndex (the ranking structure the live gateway and the simulator share)
orders exactly as the (open streams, rotated position) sort key, under updates; decode
ranking reads transport health (kv_fallback_rate)."""

from __future__ import annotations

import random

import pytest

from services.gateway.policy import (
    KV_FALLBACK_DEGRADED,
    Candidate,
    LoadIndex,
    rank_decodes,
)
from services.gateway.scheduling import Waiting, may_offer, offer_to, probe_on_enter, queue_key

pytestmark = pytest.mark.unit


def _by_sort(ids: list[str], counts: dict[str, int], tick: int) -> list[str]:
    n = len(ids)
    return [ids[i] for i in sorted(range(n), key=lambda i: (counts[ids[i]], (i - tick) % n))]


def test_ranked_equals_the_sort_key_under_random_updates() -> None:
    rng = random.Random(5)
    ids = [f"i{k}" for k in range(37)]
    idx = LoadIndex(ids)
    counts = dict.fromkeys(ids, 0)
    for step in range(3000):
        iid = rng.choice(ids)
        delta = 1 if counts[iid] == 0 or rng.random() < 0.55 else -1
        idx.add(iid, delta)
        counts[iid] += delta
        tick = rng.randrange(-5, 10**6)
        if step % 7 == 0:
            assert list(idx.ranked(tick)) == _by_sort(ids, counts, tick)
        assert idx[iid] == counts[iid] and dict(idx) == counts


def test_reset_keeps_counts_and_membership_changes() -> None:
    idx = LoadIndex(["a", "b", "c"])
    idx.add("b", 2)
    idx.reset(["b", "c", "d"], idx)
    assert dict(idx) == {"b": 2, "c": 0, "d": 0}
    assert next(idx.ranked(0)) == "c"


def test_ranked_survives_updates_between_items() -> None:
    idx = LoadIndex(["a", "b", "c", "d"])
    it = idx.ranked(0)
    assert next(it) == "a"
    idx.add("b", 1)  # b's bucket changes mid-iteration (a simulated TRY round)
    idx.add("c", 1)
    rest = list(it)
    assert set(rest) <= {"b", "c", "d"} and "d" in rest


def test_ranked_survives_a_reset_between_items() -> None:
    # The simulator's controller moves an instance into the pool mid TRY round: positions
    # past the old membership raised IndexError (bench/ratio_shift.py --quick), or the
    # old order ended early, as here.
    idx = LoadIndex(["a", "b"], {"a": 0, "b": 1})
    it = idx.ranked(0)
    assert next(it) == "a"
    idx.reset(["c", "d", "e", "a"], {"a": 3})
    rest = list(it)
    assert set(rest) <= {"a", "c", "d", "e"} and rest[:3] == ["c", "d", "e"]


def test_decodes_with_degraded_transfers_rank_after_healthy_ones() -> None:
    cands = [Candidate("slow", slots=8, kv_fallback_rate=0.9),
             Candidate("ok", slots=8, kv_fallback_rate=KV_FALLBACK_DEGRADED),
             Candidate("full", slots=2)]
    opens = {"slow": 0, "ok": 5, "full": 2}
    assert [c.instance_id for c in rank_decodes(cands, opens)] == ["ok", "slow", "full"]
    # Degraded but free still beats full.
    cands2 = [Candidate("full", slots=1), Candidate("slow", slots=4, kv_fallback_rate=1.0)]
    assert rank_decodes(cands2, {"full": 1})[0].instance_id == "slow"


def test_offer_goes_to_the_earliest_deadline_entry_without_an_offer() -> None:
    es = [Waiting("r3", "g1", 300.0), Waiting("r1", "g1", 100.0), Waiting("r2", "g2", 200.0),
          Waiting("r0", "g2", 50.0)]
    assert offer_to(es, {}, now_ms=60.0) == es[1]  # r0 expired
    assert offer_to(es, {"r1": 1000.0}, now_ms=60.0) == es[2]  # r1 holds an offer
    assert offer_to(es, {"r1": 10.0}, now_ms=60.0) == es[1]  # its offer lapsed
    assert offer_to(es, {}, now_ms=400.0) is None
    live = sorted((e for e in es if may_offer(e, {}, 60.0)), key=queue_key)
    assert live[0] == offer_to(es, {}, 60.0)


def test_a_newcomer_probes_only_when_everyone_ahead_holds_an_offer() -> None:
    ahead = [Waiting("r1", "g1", 100.0), Waiting("r2", "g2", 200.0)]
    assert probe_on_enter(ahead, {"r1": 500.0, "r2": 500.0}, now_ms=60.0)
    assert not probe_on_enter(ahead, {"r1": 500.0}, now_ms=60.0)  # r2 waits without one
    assert probe_on_enter([], {}, now_ms=60.0)


def test_a_bucket_of_one_emptied_while_a_ranking_is_read_is_skipped() -> None:
    """``ranked`` is read lazily while the index changes (a simulated TRY round spans
    events): a bucket emptied meanwhile must not yield its old member, also when it held
    only one (``add`` empties such a bucket without a search, in place)."""
    idx = LoadIndex(["p0", "p1", "p2"], {"p2": 1})
    ranking = idx.ranked(1)
    assert next(ranking) == "p1"
    idx.add("p0", 1)
    idx.add("p1", 1)  # the 0-stream bucket held only p1: now empty
    assert list(ranking) == ["p1", "p2", "p0"]  # the 1-stream bucket, rotated; no stale p1
