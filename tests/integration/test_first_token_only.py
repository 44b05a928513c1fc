"""A one-token request stages no KV: no decode follows, so the prefill neither reserves at
a kvstore nor pushes, and the gateway ends the request after the first token. A prefill
that predates the field stages KV anyway; the gateway then releases it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from pdserve.v1 import common_pb2
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration


async def _held_after(c: Cluster, within_s: float) -> int:
    end = time.monotonic() + within_s
    while True:
        held = (await c.kv_stats()).bytes_held
        if held == 0 or time.monotonic() > end:
            return int(held)
        await asyncio.sleep(0.05)


async def test_one_token_stages_no_kv_and_matches_generate(cluster: Cluster, tiny: Any) -> None:
    _, tok, model = tiny
    prompt = "The first token alone, please"
    before = await cluster.kv_stats()
    ids, _, last = await cluster.generate(prompt=prompt, max_tokens=1)
    after = await cluster.kv_stats()
    assert ids == reference(model, tok.encode(prompt), 1)
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert after.reserved_total == before.reserved_total  # no reservation, no push
    assert after.bytes_in_total == before.bytes_in_total
    assert after.bytes_held == 0
    assert last.timings.kv_transfer_ms == 0.0 and last.timings.kv_transport == ""

    # Two tokens still go through the KV handoff, token-identical.
    ids, _, _ = await cluster.generate(prompt=prompt, max_tokens=2)
    assert ids == reference(model, tok.encode(prompt), 2)
    assert (await cluster.kv_stats()).reserved_total == after.reserved_total + 1
    assert await _held_after(cluster, 5.0) == 0


async def test_a_prefill_that_ignores_the_field_has_its_kv_released(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    _, servicer = cluster.prefill_nodes[0]
    real = servicer._run

    def old_prefill(request: Any, *a: Any) -> AsyncGenerator[Any, None]:
        request.first_token_only = False  # as a prefill built before the field would
        return real(request, *a)

    monkeypatch.setattr(servicer, "_run", old_prefill)
    before = await cluster.kv_stats()
    ids, _, _ = await cluster.generate(prompt="an older prefill", max_tokens=1)
    assert len(ids) == 1
    assert (await cluster.kv_stats()).reserved_total == before.reserved_total + 1
    assert await _held_after(cluster, 5.0) == 0  # the gateway released the KvRef
