"""A rolling upgrade to new weights leaves one group with decodes of two models. The
gateway sends a request's KV only to a decode of the model that prefilled it, and when
none serves that model the request ends with a clear status and holds no KV."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import grpc
import pytest

from services.common.errors import error_info
from tests.cluster import Cluster

pytestmark = pytest.mark.integration
OTHER_WEIGHTS = "f" * 64


async def _serve_other_weights(c: Cluster, i: int, role: str = "decode") -> None:
    """Decode (or prefill) ``i`` now serves and advertises other weights, as an upgraded
    one would."""
    rt, servicer = (c.decode_nodes if role == "decode" else c.prefill_nodes)[i]
    servicer.runner.fingerprint = OTHER_WEIGHTS
    reg = rt.registration
    assert reg is not None
    reg._info = dataclasses.replace(reg._info, model_fingerprint=OTHER_WEIGHTS)
    await reg.beat()
    for _, _, view in c.gateway_nodes:
        await view.refresh()


async def _idle(c: Cluster, within_s: float = 5.0) -> int:
    end = time.monotonic() + within_s
    for _ in range(1000):
        held = (await c.kv_stats()).bytes_held
        if not held or time.monotonic() > end:
            break
        await asyncio.sleep(0.05)
    return int(held)


async def test_decodes_of_other_weights_are_skipped_then_refused(redis_url: str) -> None:
    async with Cluster(redis_url, prefills=1, decodes=2) as c:
        await _serve_other_weights(c, 0)
        for k in range(6):  # rotation would pick decode 0 for about half of them
            ids, _, last = await c.generate(prompt=f"mixed weights {k}", max_tokens=4)
            assert ids and last.finish_reason  # (the tiny model may stop early)
        stats = await c.decode_stats()
        assert stats[0].completed_total == 0 and stats[1].completed_total == 6

        await _serve_other_weights(c, 1)
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await c.generate(prompt="no decode serves these weights", max_tokens=4)
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(exc.value).reason == "KV_MODEL_MISMATCH"  # type: ignore[union-attr]
        assert "no decode in group" in (exc.value.details() or "")
        assert await _idle(c) == 0  # the staged KV was released


async def test_a_prefill_whose_weights_no_decode_serves_is_not_asked(redis_url: str) -> None:
    """Mid-roll, a prefill already on new weights has no decode of its own yet: the gateway
    sends every request to the prefill whose KV a decode takes, and none fails."""
    async with Cluster(redis_url, prefills=2, decodes=1) as c:
        await _serve_other_weights(c, 0, role="prefill")
        for k in range(6):  # rotation would pick prefill 0 for about half of them
            ids, _, last = await c.generate(prompt=f"rolling prefills {k}", max_tokens=4)
            assert ids and last.finish_reason
        stats = await c.prefill_stats()
        assert stats[0].accepted_total == 0 and stats[1].accepted_total == 6
        assert await _idle(c) == 0
