"""Prefix KV cache: reusable KV blocks keyed by chained hashes of the prompt tokens.

Block ``i`` of a prompt (tokens ``[i*B, (i+1)*B)``) is keyed by
``h_i = blake2b(h_{i-1} || tokens of block i)`` (nano-vllm style), so a key names the
whole prefix up to and including its block: two prompts share block ``i``'s KV only if
they agree on every token before it. Only full blocks are cached.

The cache is an LRU under a byte cap. A request's blocks are touched deepest first and
its root last, so within one prefix chain the leaves are older than the root and are
evicted first: an eviction never strands the rest of a chain behind a missing link.
Values are opaque here (the torch runner stores per-block K/V tensors; the trace replay
in bench/engine.py stores nothing), so this module is pure Python.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def chain_hashes(ids: Sequence[int], block_tokens: int) -> list[bytes]:
    """Chained hashes of the full ``block_tokens`` blocks of ``ids``."""
    out, prev = [], b""
    arr = np.asarray(ids, dtype=np.int64)
    for i in range(0, len(arr) - len(arr) % block_tokens, block_tokens):
        prev = hashlib.blake2b(prev + arr[i : i + block_tokens].tobytes(),
                               digest_size=16).digest()
        out.append(prev)
    return out


@dataclass
class PrefixStats:
    lookups: int = 0  # requests that looked up
    hits: int = 0  # requests that reused at least one block
    hit_blocks: int = 0
    saved_tokens: int = 0  # prompt tokens not recomputed
    inserted_blocks: int = 0
    evicted_blocks: int = 0

    @property
    def misses(self) -> int:
        return self.lookups - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0


class PrefixCache:
    """Thread-safe LRU of ``hash -> (value, nbytes)`` under ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int, block_tokens: int) -> None:
        if capacity_bytes < 0 or block_tokens <= 0:
            raise ValueError(f"need capacity_bytes >= 0 and block_tokens > 0, got "
                             f"{capacity_bytes}, {block_tokens}")
        self.capacity_bytes = capacity_bytes
        self.block_tokens = block_tokens
        self.bytes = 0
        self.stats = PrefixStats()
        self._entries: OrderedDict[bytes, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    def match(self, hashes: Sequence[bytes], max_blocks: int | None = None) -> list[Any]:
        """Values of the longest cached prefix of ``hashes`` (at most ``max_blocks``);
        counts the lookup. The matched blocks become the most recently used."""
        limit = len(hashes) if max_blocks is None else min(max_blocks, len(hashes))
        with self._lock:
            found = []
            for h in hashes[:limit]:
                entry = self._entries.get(h)
                if entry is None:
                    break
                found.append(entry[0])
            for h in reversed(hashes[: len(found)]):
                self._entries.move_to_end(h)
            s = self.stats
            s.lookups += 1
            s.hits += bool(found)
            s.hit_blocks += len(found)
            s.saved_tokens += len(found) * self.block_tokens
            return found

    def insert(self, hashes: Sequence[bytes], values: Sequence[tuple[Any, int]]) -> None:
        """Add blocks ``hashes[-len(values):]`` (each ``(value, nbytes)``) and re-touch the
        whole chain deepest first, then evict least recently used blocks over the cap."""
        with self._lock:
            new = hashes[len(hashes) - len(values):]
            for h, (value, nbytes) in zip(new, values, strict=True):
                if h in self._entries or nbytes > self.capacity_bytes:
                    continue
                self._entries[h] = (value, nbytes)
                self.bytes += nbytes
                self.stats.inserted_blocks += 1
            for h in reversed(hashes):
                if h in self._entries:
                    self._entries.move_to_end(h)
            while self.bytes > self.capacity_bytes and self._entries:
                _, (_, nbytes) = self._entries.popitem(last=False)
                self.bytes -= nbytes
                self.stats.evicted_blocks += 1

    def metrics(self) -> dict[str, float]:
        s = self.stats
        return {"prefix_lookups": float(s.lookups), "prefix_hits": float(s.hits),
                "prefix_misses": float(s.misses), "prefix_saved_tokens": float(s.saved_tokens),
                "prefix_blocks": float(len(self._entries)), "prefix_bytes": float(self.bytes),
                "prefix_evicted_blocks": float(s.evicted_blocks)}
