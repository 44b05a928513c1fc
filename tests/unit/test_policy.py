"""services.gateway.policy: least-open-streams ranking and decode slot awareness."""

from __future__ import annotations

from collections import Counter

import pytest

from services.gateway.policy import Candidate, rank_decodes, rank_least_open_streams

pytestmark = pytest.mark.unit


def _ids(cands: list[Candidate]) -> list[str]:
    return [c.instance_id for c in cands]


def test_empty_input() -> None:
    assert rank_least_open_streams([], {"a": 1}) == []
    assert rank_decodes([], {}, tie_break=5) == []


def test_fewest_open_streams_first() -> None:
    cands = [Candidate("a"), Candidate("b"), Candidate("c"), Candidate("d")]
    ranked = rank_least_open_streams(cands, {"a": 3, "b": 1, "c": 2})  # d unknown: 0
    assert _ids(ranked) == ["d", "b", "c", "a"]


def test_ranking_is_a_permutation_and_does_not_mutate_input() -> None:
    cands = [Candidate(f"i{n}") for n in range(6)]
    before = list(cands)
    ranked = rank_least_open_streams(cands, {"i2": 1, "i4": 1}, tie_break=3)
    assert sorted(_ids(ranked)) == sorted(_ids(cands))
    assert cands == before


def test_tie_break_rotates_equal_candidates() -> None:
    cands = [Candidate("a"), Candidate("b"), Candidate("c")]
    firsts = [rank_least_open_streams(cands, {}, tie_break=t)[0].instance_id for t in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    assert _ids(rank_least_open_streams(cands, {}, tie_break=1)) == ["b", "c", "a"]


def test_tie_break_spreads_only_among_the_least_loaded() -> None:
    cands = [Candidate("a"), Candidate("busy"), Candidate("c"), Candidate("d")]
    opens = {"busy": 1}
    picks = Counter(
        rank_least_open_streams(cands, opens, tie_break=t)[0].instance_id for t in range(40)
    )
    assert "busy" not in picks
    assert set(picks) == {"a", "c", "d"}  # every equal candidate gets a turn
    assert max(picks.values()) <= 2 * min(picks.values())


def test_load_beats_tie_break() -> None:
    cands = [Candidate("a"), Candidate("b")]
    for t in range(4):
        assert rank_least_open_streams(cands, {"a": 1}, tie_break=t)[0].instance_id == "b"


def test_negative_and_large_tie_breaks_are_fine() -> None:
    cands = [Candidate("a"), Candidate("b"), Candidate("c")]
    assert _ids(rank_least_open_streams(cands, {}, tie_break=-1)) == ["c", "a", "b"]
    assert _ids(rank_least_open_streams(cands, {}, tie_break=10**12 + 2)) == (
        _ids(rank_least_open_streams(cands, {}, tie_break=(10**12 + 2) % 3)))


def test_rank_decodes_puts_full_decodes_last() -> None:
    cands = [Candidate("full", slots=2), Candidate("busy", slots=8), Candidate("idle", slots=8)]
    opens = {"full": 2, "busy": 5, "idle": 3}
    # By open streams alone "full" (2) would come first; it has no free slot.
    assert _ids(rank_least_open_streams(cands, opens)) == ["full", "idle", "busy"]
    assert _ids(rank_decodes(cands, opens)) == ["idle", "busy", "full"]


def test_rank_decodes_over_full_counts_as_full_and_keeps_order() -> None:
    cands = [Candidate("x", slots=1), Candidate("y", slots=1), Candidate("z", slots=4)]
    opens = {"x": 3, "y": 1, "z": 4}
    ranked = rank_decodes(cands, opens)
    assert _ids(ranked) == ["y", "x", "z"]  # all full: least-open order is kept


def test_rank_decodes_zero_slots_means_unlimited() -> None:
    cands = [Candidate("unknown", slots=0), Candidate("small", slots=1)]
    opens = {"unknown": 50, "small": 1}
    assert _ids(rank_decodes(cands, opens)) == ["unknown", "small"]


def test_rank_decodes_rotates_among_free_equals() -> None:
    cands = [Candidate("a", slots=2), Candidate("b", slots=2), Candidate("f", slots=1)]
    opens = {"f": 1}
    firsts = {rank_decodes(cands, opens, tie_break=t)[0].instance_id for t in range(3)}
    assert firsts == {"a", "b"}
    for t in range(3):
        assert rank_decodes(cands, opens, tie_break=t)[-1].instance_id == "f"
