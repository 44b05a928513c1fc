"""ReserveKv on the kvstore's Unix socket (services/kv/reserve.py) in the in-process
cluster: after the first request (over gRPC, which teaches the prefill the socket) the
reservation takes the data channel; a full kvstore refuses it with the same status as
over gRPC; a kvstore whose socket is gone is reached over gRPC; nothing is left held."""

from __future__ import annotations

import grpc
import pytest

from services.common.errors import error_info
from tests.cluster import Cluster
from tests.integration.conftest import reference

pytestmark = pytest.mark.integration
PROMPT = "Reservations on the Unix socket. " * 3


async def _identical(c: Cluster, tiny) -> None:  # type: ignore[no-untyped-def]
    _, tok, model = tiny
    got, _, _ = await c.generate(prompt=PROMPT, max_tokens=6)
    assert got == reference(model, tok.encode(PROMPT), 6)


@pytest.fixture(autouse=True)
def untraced(monkeypatch: pytest.MonkeyPatch) -> None:
    """The test session exports spans, and a traced request reserves over gRPC (so the
    call joins its trace); these tests are about untraced ones, as in production
    without an OTLP endpoint."""
    from services.prefill import handoff

    monkeypatch.setattr(handoff, "traced", lambda: False)


async def test_reservations_take_the_unix_socket_after_the_first(redis_url: str, tiny) -> None:  # type: ignore[no-untyped-def]
    async with Cluster(redis_url) as c:
        for _ in range(3):
            await _identical(c, tiny)
        counters = c.kvstore.data.counters
        assert counters["reserve.ok"] == 2  # the first went over gRPC
        stats = await c.kv_stats()
        assert stats.reserved_total == 3 and stats.bytes_held == 0

        # A KV over the capacity: the same status and reason as over gRPC.
        c.kvstore.store.capacity_bytes = 1024
        with pytest.raises(grpc.aio.AioRpcError) as ei:
            await c.generate(prompt=PROMPT, max_tokens=4)
        c.kvstore.store.capacity_bytes = 4 << 30
        info = error_info(ei.value)
        assert (ei.value.code(), info and info.reason) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED, "KV_TOO_LARGE")
        assert counters["reserve.refused"] == 1

        # The socket is gone (as after a kvstore restart): gRPC carries the reservation.
        c.kvstore.data.reserver = None
        await _identical(c, tiny)
        assert counters["reserve.ok"] == 2
        assert (await c.kv_stats()).bytes_held == 0


async def test_a_traced_request_reserves_over_grpc(redis_url: str, tiny,  # type: ignore[no-untyped-def]
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from services.prefill import handoff

    async with Cluster(redis_url) as c:
        await _identical(c, tiny)
        monkeypatch.setattr(handoff, "traced", lambda: True)
        await _identical(c, tiny)
        assert c.kvstore.data.counters["reserve.ok"] == 0


async def test_shm_off_keeps_reservations_on_grpc(redis_url: str, tiny) -> None:  # type: ignore[no-untyped-def]
    tcp = {"kv_transports": "tcp"}
    async with Cluster(redis_url, worker_overrides=tcp) as c:
        for _ in range(2):
            await _identical(c, tiny)
        assert c.kvstore.data.counters["reserve.ok"] == 0
        assert (await c.kv_stats()).reserved_total == 2


@pytest.mark.parametrize("point", ["kvstore.reserve", "prefill.before_reserve",
                                   "prefill.after_reserve"])
async def test_cancel_around_a_unix_socket_reservation_holds_no_kv(redis_url: str,
                                                                  point: str) -> None:
    import asyncio
    import time

    from tests.integration.test_reliability import cancel_at

    async with Cluster(redis_url, prefills=1, decodes=1) as c:
        await c.generate(prompt=PROMPT, max_tokens=2)  # teaches the prefill the socket
        await cancel_at(c, point)
        counters = c.kvstore.data.counters
        want = 0 if point == "prefill.before_reserve" else 1  # over the Unix socket
        t0 = time.monotonic()  # the kvstore answers once its pause ends
        while counters["reserve.ok"] < want and time.monotonic() - t0 < 2.5:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        assert counters["reserve.ok"] == want, dict(counters)
        while (await c.kv_stats()).bytes_held and time.monotonic() - t0 < 2.5:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
        stats = await c.kv_stats()
        assert stats.bytes_held == 0 and stats.expired_total == 0
