"""Fleet-scale arrivals from a shipped trace: each group replays the trace, rotated and
time-compressed, for as long as the run lasts.

The traces are far too sparse for 10,000 instances (Azure code: 8,819 requests in an
hour), so group ``g`` gets its own copy of the trace:
- **rotated**: it starts at offset ``frac(g * 0.618...) * span`` and wraps around, so the
  groups' bursts do not line up (a fleet-wide synchronised burst is not what a trace of
  one service shows);
- **time-compressed** by ``compress``: one group sees ``compress`` times the trace's
  rate. ``compress_for`` picks it from a target prefill utilisation (the issue's "at
  least half the prefill capacity in use");
- **replicated**: past 3x, the group's stream is several rotated copies of the trace
  superposed, each compressed at most 3x (``copies_for``), since a bursty trace
  compressed 20x alone would be bursts of ten times the capacity and idle gaps;
- **looped** until ``duration_ms``: the trace repeats end to end.
Requests are generated lazily, one pending arrival per group (memory O(groups)).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_left
from collections.abc import Iterator, Sequence

from bench.sim.model import SimConfig, SimRequest
from bench.traces import TraceRequest
from services.engine.mock import LatencyModel

GOLDEN = (math.sqrt(5) - 1) / 2


def span_s(trace: Sequence[TraceRequest]) -> float:
    """The trace's length, plus one mean gap so that a looped trace has no hole."""
    t0, t1 = trace[0].arrival_s, trace[-1].arrival_s
    return (t1 - t0) * len(trace) / max(len(trace) - 1, 1) or 1.0


def compress_for(trace: Sequence[TraceRequest], cfg: SimConfig, lat: LatencyModel,
                 utilisation: float, max_prompt: int) -> float:
    """The compression at which the trace alone would keep ``utilisation`` of a group's
    prefill slots busy: offered slot-ms per second over the slots a group has."""
    kv = cfg.kv_bytes_per_token / (cfg.kv_gbps * 1e6)
    work_ms = sum(lat.prefill_ms(min(r.prompt_len, max_prompt)) * cfg.time_scale
                  + min(r.prompt_len, max_prompt) * kv + cfg.kv_fixed_ms for r in trace)
    offered = work_ms / (span_s(trace) * 1e3)  # busy slots the trace keeps, uncompressed
    return utilisation * cfg.prefills_per_group * cfg.slots / offered


def copies_for(compress: float, max_per_copy: float = 3.0) -> int:
    """How many rotated copies of the trace make a group's stream: enough that none is
    compressed more than ``max_per_copy`` times. A bursty trace (Azure code: 8,819
    requests in 915 distinct seconds of 3,436, up to 67 in one) compressed 20x alone
    turns each burst into ten times a group's capacity; superposed copies keep the trace's
    shape at the rate asked (the law of large numbers on the bursts)."""
    return max(1, math.ceil(compress / max_per_copy))


def _one_copy(times: list[float], span: float, offset: float, scale: float,
              duration_ms: float) -> Iterator[tuple[float, int]]:
    n = len(times)
    k0 = bisect_left(times, offset)
    j = 0
    while True:
        m = k0 + j
        pos = m % n
        t = (times[pos] + (m // n) * span - offset) * scale
        if t >= duration_ms:
            return
        yield t, pos
        j += 1


def group_stream(trace: Sequence[TraceRequest], group: int, compress: float,
                 duration_ms: float, max_prompt: int, copies: int = 0,
                 ) -> Iterator[tuple[int, SimRequest]]:
    """(index, request) for one group in arrival order, up to ``duration_ms``: ``copies``
    rotated copies of the trace (0: ``copies_for(compress)``), each compressed by
    ``compress / copies``, merged. Indices are ``(group << 32) | k``, unique in a fleet."""
    copies = copies or copies_for(compress)
    times, span = _times(trace)
    scale = 1e3 * copies / compress
    streams = [_one_copy(times, span, ((group * copies + c) * GOLDEN % 1.0) * span, scale,
                         duration_ms) for c in range(copies)]
    base = group << 32
    for j, (t, pos) in enumerate(streams[0] if copies == 1 else heapq.merge(*streams)):
        r = trace[pos]
        yield (base | j, SimRequest(t, min(r.prompt_len, max_prompt), r.output_len, group,
                                    r.hash_ids))


# The arrival offsets of the last trace asked for, computed once per trace and not once per
# group (625 groups x 23k requests of Mooncake cost 2-3% of a 20 s run). Keyed by the
# object itself: the list is kept alive, so its id cannot be reused meanwhile.
_TIMES: dict[int, tuple[Sequence[TraceRequest], list[float], float]] = {}


def _times(trace: Sequence[TraceRequest]) -> tuple[list[float], float]:
    hit = _TIMES.get(id(trace))
    if hit is None or hit[0] is not trace:
        t0 = trace[0].arrival_s
        hit = (trace, [r.arrival_s - t0 for r in trace], span_s(trace))
        _TIMES.clear()
        _TIMES[id(trace)] = hit
    return hit[1], hit[2]
