"""Routing policy: pure functions over snapshots, no I/O, no clock.

The live gateway, a mock cluster and the simulator (``bench/sim``) call the same code.
Inputs are the group's candidates (from the registry) and the gateway's own counts of
streams it has open on each instance.

``LoadIndex`` is the one ranking structure: the instances of one pool bucketed by open
streams, so the least-loaded instance (and the rest, lazily, in order) comes out in
O(log n) without scanning the pool. The simulator keeps one per pool and updates it as
streams open and close. The live gateway builds one per decision from its registry
snapshot and counters (``rank_least_open_streams``): its candidate list is fresh from
Redis every poll, and a decision costs an RPC anyway. Both rank with ``LoadIndex.ranked``.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# A decode whose KV fetches fell back from the negotiated transport more often than this
# (``kv_fallback_rate`` in its registry load) ranks after the healthy ones with a free
# slot: its transfers take the slow path, so new streams go elsewhere while others can
# take them. It still ranks before full decodes, so it is used rather than nothing.
KV_FALLBACK_DEGRADED = 0.2


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    slots: int = 0
    reported_busy: float = 0.0  # from the instance's last heartbeat (stale by up to 1 period)
    kv_fallback_rate: float = 0.0  # share of KV transfers that fell back (heartbeat load)


class LoadIndex(Mapping[str, int]):
    """Open-stream counts of one pool's instances, bucketed by count.

    Positions are the order the instances were given in (``ids``); ties among equal
    counts rotate by ``tie_break`` over those positions, exactly as the sort key
    ``(count, (position - tie_break) % n)`` would order them. ``add`` is O(log n) plus a
    short list move; ``ranked`` yields the first instance in O(log n + distinct counts)."""

    __slots__ = ("_buckets", "_counts", "_ids", "_pos")

    def __init__(self, ids: Iterable[str] = (), counts: Mapping[str, int] | None = None) -> None:
        self._ids: list[str] = []
        self._pos: dict[str, int] = {}
        self._counts: list[int] = []
        self._buckets: dict[int, list[int]] = {}
        self.reset(ids, counts)

    def reset(self, ids: Iterable[str], counts: Mapping[str, int] | None = None) -> None:
        """New membership (a registry change, a role switch): O(n)."""
        new_ids = list(ids)
        get = (counts or {}).get  # may be this index itself: read before replacing
        new_counts = [int(get(iid, 0)) for iid in new_ids]
        self._ids = new_ids
        self._pos = {iid: i for i, iid in enumerate(new_ids)}
        self._counts = new_counts
        self._buckets = {}
        for i, c in enumerate(self._counts):
            self._buckets.setdefault(c, []).append(i)

    # -- Mapping ------------------------------------------------------------------------
    def __getitem__(self, iid: str) -> int:
        return self._counts[self._pos[iid]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, iid: object) -> bool:
        return iid in self._pos

    def get(self, iid: str, default: Any = None) -> Any:
        """``Mapping.get`` without its two Python calls (``pick_decodes`` reads the counts
        through it, per candidate)."""
        i = self._pos.get(iid)
        return default if i is None else self._counts[i]

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    # -- updates ------------------------------------------------------------------------
    def add(self, iid: str, delta: int) -> None:
        # Runs on every stream opened and closed (the simulator: 8 times a request), so
        # attributes are read once and a bucket of one is emptied without a search (in
        # place: a ``ranked`` being read may hold the list).
        i = self._pos[iid]
        counts, buckets = self._counts, self._buckets
        c = counts[i]
        b = buckets[c]
        if len(b) == 1:
            b.clear()
            del buckets[c]
        else:
            del b[bisect_left(b, i)]
        c += delta
        counts[i] = c
        nb = buckets.get(c)
        if nb is None:
            buckets[c] = [i]
        else:
            insort(nb, i)

    # -- queries ------------------------------------------------------------------------
    def ranked(self, tie_break: int = 0) -> Iterator[str]:
        """Fewest open streams first; equal counts rotate from position ``tie_break``."""
        n = len(self._ids)
        if not n:
            return
        t = tie_break % n
        ids = self._ids
        # Read lazily: a caller may update the index between two items (a simulated TRY
        # round spans events); a bucket emptied meanwhile is skipped.
        for c in sorted(self._buckets):
            if self._ids is not ids:  # reset meanwhile: old positions mean nothing now
                yield from self.ranked(tie_break)
                return
            b = self._buckets.get(c)
            if not b:
                continue
            k = bisect_left(b, t)
            # Indexing, not slicing: the first item must not cost a copy of the bucket.
            j = k
            while j < len(b):
                if self._ids is not ids:
                    yield from self.ranked(tie_break)
                    return
                yield ids[b[j]]
                j += 1
            j = 0
            while j < k and j < len(b):
                if self._ids is not ids:
                    yield from self.ranked(tie_break)
                    return
                yield ids[b[j]]
                j += 1


def rank_least_open_streams(
    candidates: Sequence[Candidate], open_streams: Mapping[str, int], tie_break: int = 0
) -> list[Candidate]:
    """Fewest gateway-open streams first; ties rotate by ``tie_break`` so equal
    instances share load instead of the first one taking everything."""
    if not candidates:
        return []
    index = LoadIndex((c.instance_id for c in candidates), open_streams)
    by_id = {c.instance_id: c for c in candidates}
    return [by_id[iid] for iid in index.ranked(tie_break)]


def decode_tier(open_now: int, slots: int, kv_fallback_rate: float) -> int:
    """0: a free slot and healthy transfers; 1: a free slot, transfers degraded
    (``kv_fallback_rate`` above ``KV_FALLBACK_DEGRADED``); 2: full by our own count."""
    if slots and open_now >= slots:
        return 2
    return 1 if kv_fallback_rate > KV_FALLBACK_DEGRADED else 0


def pick_decodes(ranked: Iterable[str], open_streams: Mapping[str, int],
                 slots: Mapping[str, int], fallback: Mapping[str, float]) -> Iterator[str]:
    """Decodes in ``ranked`` (least-open) order, healthy ones with a free slot first, then
    degraded ones with a free slot, then full ones. Lazy: the first healthy free decode
    comes out without looking further."""
    later: list[list[str]] = [[], []]
    for iid in ranked:
        tier = decode_tier(open_streams.get(iid, 0), slots.get(iid, 0), fallback.get(iid, 0.0))
        if tier == 0:
            yield iid
        else:
            later[tier - 1].append(iid)
    yield from later[0]
    yield from later[1]


def rank_decodes(
    candidates: Sequence[Candidate], open_streams: Mapping[str, int], tie_break: int = 0
) -> list[Candidate]:
    """Least-loaded decode with a free slot first (healthy transfers before degraded
    ones, see ``KV_FALLBACK_DEGRADED``); full ones (by our own count) last."""
    if not candidates:
        return []
    by_id = {c.instance_id: c for c in candidates}
    index = LoadIndex((c.instance_id for c in candidates), open_streams)
    slots = {c.instance_id: c.slots for c in candidates}
    fallback = {c.instance_id: c.kv_fallback_rate for c in candidates}
    return [by_id[iid] for iid in pick_decodes(index.ranked(tie_break), open_streams, slots,
                                               fallback)]


def same_weights(a: str, b: str) -> bool:
    """Two model fingerprints that may name the same weights: equal, or one unknown
    (empty; that instance checks a KvRef's fingerprint itself)."""
    return not a or not b or a == b


def servable_prefills(prefills: Sequence[str], decodes: Iterable[str]) -> list[int]:
    """Indexes of the prefills (given by model fingerprint) whose KV some decode takes.

    During a roll to new weights a group holds both revisions, and a prefill of a revision
    no decode serves would compute KV that every decode refuses (KV_MODEL_MISMATCH). If no
    prefill matches, all are kept: the request then fails with that status rather than
    with none."""
    fps = set(decodes)
    keep = [i for i, fp in enumerate(prefills) if any(same_weights(fp, d) for d in fps)]
    return keep or list(range(len(prefills)))
