"""A stream that sends nothing for a while (a request waiting in the forwarding queue, a
drain, a long prefill) must survive its client's keepalive pings. grpc-core clients stop
after two pings without data, but clients in other languages (and grpc-core with
``grpc.http2.max_pings_without_data`` = 0) keep pinging; a server with gRPC's defaults
answers the third ping of a silent stream with GOAWAY "too_many_pings" and the call ends
UNAVAILABLE. Ours accept a ping every ``SERVER_PING_MIN_MS``."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from services.common.runtime import SERVER_OPTIONS, SERVER_PING_MIN_MS

pytestmark = pytest.mark.integration
METHOD = "/pdserve.test.Quiet/Wait"


async def _wait(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    await asyncio.sleep(float(request.decode()))  # silent: no data frames meanwhile
    yield b"done"


async def _silent_stream(server_options: tuple[tuple[str, int], ...], silent_s: float) -> bytes:
    server = grpc.aio.server(options=server_options)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "pdserve.test.Quiet", {"Wait": grpc.unary_stream_rpc_method_handler(_wait)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # A client that keeps pinging as often as the servers allow (ours: every 10 s).
    opts = [("grpc.keepalive_time_ms", SERVER_PING_MIN_MS),
            ("grpc.http2.max_pings_without_data", 0)]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
            call = ch.unary_stream(METHOD)(str(silent_s).encode(), timeout=60)
            return b"".join([m async for m in call])
    finally:
        await server.stop(0)


# A default server answers a silent stream's fifth ping (after ~25 s at 5 s) with GOAWAY.
SILENT_S = 6 * SERVER_PING_MIN_MS / 1e3


async def test_a_silent_stream_outlives_the_clients_pings_and_defaults_would_cut_it() -> None:
    # Both at once (30 s of silence each): ours, and gRPC's defaults, which fail.
    defaults = tuple(o for o in SERVER_OPTIONS if "ping" not in o[0] and "permit" not in o[0])
    ours, theirs = await asyncio.gather(_silent_stream(tuple(SERVER_OPTIONS), SILENT_S),
                                        _silent_stream(defaults, SILENT_S),
                                        return_exceptions=True)
    assert ours == b"done"
    assert isinstance(theirs, grpc.aio.AioRpcError), theirs
    assert theirs.code() == grpc.StatusCode.UNAVAILABLE and "ping" in (theirs.details() or "")
