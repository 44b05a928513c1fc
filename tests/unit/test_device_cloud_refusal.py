"""A cloud that refuses a chat (a wrong API key) is visible in the chat's summary also when
the device has already taken over: its status can reach the device after the device
prefilled the prompt but before the reader task has read it, and then the hand-off's
cancel is a no-op on a finished call. The device's own cancel is not a failure.

The cloud is a stand-in call object with grpc.aio's surface (iteration, ``done``,
``cancel``); the device is the mock profile engine on a real model thread."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from pdserve.v1 import device_service_pb2 as dpb
from services.device.engine import MockDevice
from services.device.session import ChatRun, RunSettings
from services.engine.worker import ModelThread


class _Call:
    """A Generate call whose final status is ``code``, read only once the device has
    handed off (the hand-off asks ``done()`` before it cancels). ``arrived`` says whether
    that status was already on the wire then."""

    def __init__(self, code: grpc.StatusCode, arrived: bool) -> None:
        self._code, self._arrived = code, arrived
        self._handed_off = asyncio.Event()
        self.cancelled = False

    def done(self) -> bool:
        self._handed_off.set()
        return self._arrived

    def cancel(self) -> bool:
        self.cancelled = True
        return True

    def __aiter__(self) -> _Call:
        return self

    async def __anext__(self) -> Any:
        await self._handed_off.wait()
        if self.cancelled:
            raise asyncio.CancelledError  # what grpc.aio raises after a local cancel
        raise grpc.aio.AioRpcError(self._code, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                   details="invalid API key")


class _Stub:
    def __init__(self, call: Any) -> None:
        self.call = call

    def Generate(self, req: Any) -> Any:
        return self.call


async def _chat(code: grpc.StatusCode, arrived: bool) -> tuple[dpb.ChatSummary, _Call]:
    engine = MockDevice("phone", vocab_size=256, scale=0.01)
    thread = ModelThread("test-device")
    call = _Call(code, arrived)
    s = RunSettings(mode=dpb.DEVICE_MODE_PD_DEVICE, max_tokens=6, cloud_timeout_s=5.0)
    run = ChatRun(engine, thread, _Stub(call), list(range(1, 20)), (), s, "r1")
    try:
        run.start()
        shown = [t async for batch in run.display() for t in batch]
        assert len(shown) == 6  # the device answers alone
        return run.summary(dpb.DEVICE_MODE_PD_DEVICE), call
    finally:
        await run.close()
        thread.shutdown()


async def test_a_refusal_that_lands_after_the_hand_off_still_shows() -> None:
    summary, call = await _chat(grpc.StatusCode.UNAUTHENTICATED, arrived=True)
    assert "UNAUTHENTICATED" in summary.fallback and "already taken over" in summary.fallback
    assert summary.cloud_tokens == 0 and not call.cancelled


async def test_the_devices_own_cancel_is_not_a_failure() -> None:
    summary, call = await _chat(grpc.StatusCode.UNAUTHENTICATED, arrived=False)
    assert call.cancelled and summary.fallback == "" and summary.cloud_tokens == 0
