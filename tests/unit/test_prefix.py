"""Prefix KV cache: chained hashes, LRU under a byte cap, and token identity of a hit and
of a recomputed (evicted) prefix with the tiny model."""

from __future__ import annotations

import pytest
import torch

from services.engine.prefix import PrefixCache, chain_hashes
from services.engine.runner import ModelRunner
from services.engine.sampling import Sampling
from tests.integration.conftest import reference

pytestmark = pytest.mark.unit


def test_chained_hashes_name_the_whole_prefix() -> None:
    a = chain_hashes(list(range(40)), 8)
    b = chain_hashes([*range(16), 99, *range(17, 40)], 8)
    assert len(a) == 5 and len(chain_hashes(list(range(39)), 8)) == 4  # full blocks only
    assert a[:2] == b[:2] and all(x != y for x, y in zip(a[2:], b[2:], strict=True))


def test_match_is_the_longest_cached_prefix_and_counts() -> None:
    c = PrefixCache(1000, 8)
    h = chain_hashes(list(range(32)), 8)
    c.insert(h[:3], [("b0", 10), ("b1", 10), ("b2", 10)])
    assert c.match(h) == ["b0", "b1", "b2"]
    assert c.match(h, max_blocks=2) == ["b0", "b1"]
    assert c.match(chain_hashes([7] * 32, 8)) == []
    s = c.stats
    assert (s.lookups, s.hits, s.misses, s.hit_blocks, s.saved_tokens) == (3, 2, 1, 5, 40)
    assert c.metrics()["prefix_bytes"] == 30.0


def test_lru_evicts_leaves_before_roots_and_respects_the_cap() -> None:
    c = PrefixCache(40, 8)
    x = chain_hashes(list(range(32)), 8)  # 4 blocks of 10 bytes: exactly the cap
    c.insert(x, [(i, 10) for i in range(4)])
    y = chain_hashes([5] * 16, 8)
    c.insert(y, [("y0", 10), ("y1", 10)])  # 60 > 40: two of x's go, deepest first
    assert c.bytes == 40 and c.stats.evicted_blocks == 2
    assert c.match(x) == [0, 1]  # x's root and second block survive, the leaves went
    assert c.match(y) == ["y0", "y1"]
    c.insert(x[:1], [])  # re-touching only, nothing added
    assert len(c) == 4


def test_a_block_larger_than_the_cap_is_not_cached() -> None:
    c = PrefixCache(5, 8)
    c.insert(chain_hashes(list(range(8)), 8), [("big", 10)])
    assert len(c) == 0 and c.bytes == 0


@pytest.fixture(scope="module")
def runners() -> tuple[ModelRunner, ModelRunner]:
    plain, cached = ModelRunner("tiny", threads=1), ModelRunner("tiny", threads=1)
    cached.attach_prefix_cache(64 << 20, 16)
    return plain, cached


def _generate(runner: ModelRunner, ids: list[int], n: int) -> list[int]:
    first, cache = runner.prefill(ids, Sampling())
    out = [first]
    for _ in range(n - 1):
        out.append(runner.decode_step(out[-1], cache, Sampling()))
    return out


def test_a_prefix_hit_is_token_identical(runners: tuple[ModelRunner, ModelRunner]) -> None:
    plain, cached = runners
    system = [(7 * i) % 240 + 3 for i in range(80)]  # a shared 80-token "system prompt"
    questions = [[11, 12, 13], [40, 41, 42, 43, 44, 45, 46], list(range(100, 140))]
    assert cached.prefix is not None
    for i, q in enumerate(questions):
        ids = system + q
        before = cached.prefix.stats.saved_tokens
        got = _generate(cached, ids, 12)
        assert got == reference(plain.model, ids, 12)
        if i:
            assert cached.prefix.stats.saved_tokens - before == 80  # 5 blocks of 16 reused
        # The KV handed to decode is whole and the same as a full prefill's.
        _, full = plain.prefill(ids, Sampling())
        _, hit = cached.prefill(ids, Sampling())
        for a, b in zip(full.layers, hit.layers, strict=True):
            assert a.keys.shape == b.keys.shape
            torch.testing.assert_close(a.keys, b.keys)


def test_an_evicted_prefix_is_recomputed_correctly() -> None:
    plain = ModelRunner("tiny", threads=1)
    r = ModelRunner("tiny", threads=1)
    cfg = r.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    block_bytes = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * 16 * head_dim * 4
    prefix = r.attach_prefix_cache(3 * block_bytes, 16)  # room for 3 blocks
    a = [(3 * i) % 200 + 5 for i in range(50)]
    b = [(5 * i) % 200 + 9 for i in range(50)]
    assert _generate(r, a, 10) == reference(plain.model, a, 10)  # caches a's 3 blocks
    assert _generate(r, b, 10) == reference(plain.model, b, 10)  # evicts them for b's
    assert prefix.stats.evicted_blocks == 3
    hits = prefix.stats.hits
    assert _generate(r, a, 10) == reference(plain.model, a, 10)  # recomputed, still identical
    assert prefix.stats.hits == hits  # a was a miss
