"""Routing policy: pure functions over snapshots, no I/O, no clock.

The live gateway, a mock cluster and a simulator call the same code. Inputs are
the group's candidates (from the registry) and the gateway's own counts of
streams it has open on each instance.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    slots: int = 0
    reported_busy: float = 0.0  # from the instance's last heartbeat (stale by up to 1 period)


def rank_least_open_streams(
    candidates: Sequence[Candidate], open_streams: Mapping[str, int], tie_break: int = 0
) -> list[Candidate]:
    """Fewest gateway-open streams first; ties rotate by ``tie_break`` so equal
    instances share load instead of the first one taking everything."""
    if not candidates:
        return []
    n = len(candidates)
    order = sorted(range(n), key=lambda i: (open_streams.get(candidates[i].instance_id, 0),
                                            (i - tie_break) % n))
    return [candidates[i] for i in order]


def rank_decodes(
    candidates: Sequence[Candidate], open_streams: Mapping[str, int], tie_break: int = 0
) -> list[Candidate]:
    """Least-loaded decode with a free slot first; full ones (by our own count) last."""
    ranked = rank_least_open_streams(candidates, open_streams, tie_break)
    free = [c for c in ranked if not c.slots or open_streams.get(c.instance_id, 0) < c.slots]
    full = [c for c in ranked if c not in free]
    return free + full
