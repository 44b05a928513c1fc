"""Fleet arrivals (bench/sim/arrivals.py): each group replays rotated, compressed and,
past 3x, replicated copies of a trace, in time order, at the rate asked."""

from __future__ import annotations

import itertools

import pytest

from bench.sim.arrivals import copies_for, group_stream, span_s
from bench.traces import AZURE_CODE, load_trace

pytestmark = pytest.mark.unit
TRACE = load_trace(str(AZURE_CODE))


@pytest.mark.parametrize("compress", [1.0, 2.5, 21.0])
def test_a_group_stream_is_ordered_bounded_and_at_the_rate_asked(compress: float) -> None:
    duration_ms = 600_000.0
    items = list(group_stream(TRACE, 3, compress, duration_ms, 16384))
    times = [r.arrival_ms for _, r in items]
    assert all(b >= a for a, b in itertools.pairwise(times))
    assert times[-1] < duration_ms and all(r.group == 3 for _, r in items)
    assert len({i for i, _ in items}) == len(items)  # unique indices
    want = len(TRACE) / span_s(TRACE) * compress * duration_ms / 1e3
    assert 0.5 * want < len(items) < 1.5 * want  # bursty trace, 10 minutes of it


def test_groups_get_different_rotations_and_bursts_are_spread_by_copies() -> None:
    a = [r.arrival_ms for _, r in group_stream(TRACE, 0, 21.0, 60_000.0, 16384)]
    b = [r.arrival_ms for _, r in group_stream(TRACE, 1, 21.0, 60_000.0, 16384)]
    assert a[:50] != b[:50]
    assert copies_for(21.0) == 7 and copies_for(2.0) == 1

    def worst_second(times: list[float]) -> int:
        per = {}
        for t in times:
            per[int(t // 1000)] = per.get(int(t // 1000), 0) + 1
        return max(per.values())

    one = [r.arrival_ms for _, r in group_stream(TRACE, 0, 21.0, 60_000.0, 16384, copies=1)]
    assert worst_second(a) < worst_second(one)  # superposed copies smooth the bursts


def test_prompts_are_clipped_to_the_modelled_context() -> None:
    assert max(r.prompt_len for _, r in group_stream(TRACE, 0, 5.0, 120_000.0, 1000)) <= 1000
