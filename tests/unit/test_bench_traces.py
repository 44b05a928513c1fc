"""Trace prompts: shared prefixes inside one replay, nothing shared across replays."""

from __future__ import annotations

import pytest

from bench.traces import HASH_BLOCK, TraceRequest, prompt_ids

pytestmark = pytest.mark.unit


def test_equal_hash_ids_share_blocks_within_a_replay_only() -> None:
    a = TraceRequest(0.0, 2 * HASH_BLOCK + 7, 4, (11, 12))
    b = TraceRequest(0.0, HASH_BLOCK + 3, 4, (11, 99))
    pa, pb = prompt_ids(a, 0, 1000, salt=1), prompt_ids(b, 1, 1000, salt=1)
    assert len(pa) == a.prompt_len and len(pb) == b.prompt_len
    assert pa[:HASH_BLOCK] == pb[:HASH_BLOCK] and pa[HASH_BLOCK:] != pb[HASH_BLOCK:]
    assert prompt_ids(a, 0, 1000, salt=2)[:HASH_BLOCK] != pa[:HASH_BLOCK]


def test_plain_prompts_differ_per_replay_and_repeat_per_salt() -> None:
    r = TraceRequest(0.0, 300, 4)
    assert prompt_ids(r, 5, 1000, salt=1) == prompt_ids(r, 5, 1000, salt=1)
    assert prompt_ids(r, 5, 1000, salt=1) != prompt_ids(r, 5, 1000, salt=2)
    assert all(16 <= t < 1000 for t in prompt_ids(r, 5, 1000))
