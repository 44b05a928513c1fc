"""A drain that ends a call in flight always ends it with a status (ABORTED
INSTANCE_DRAINED), wherever the call's task is when the drain comes:

- waiting on the role's own stream (the next token): the task is cancelled there, the
  role's stream is closed (its cleanup runs), and the relay aborts the RPC;
- inside grpc's send of the previous message: the task is not cancelled (grpc.aio would
  end the RPC with no status, and the caller would wait forever); the relay aborts the
  RPC when the send returns.

grpc's side is a stand-in consumer whose "send" is an await outside the relay; the
context's ``abort_with_status`` raises as grpc's does."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from services.worker.host import Relay, _Call


class _Aborted(Exception):
    def __init__(self, status: Any) -> None:
        self.status = status


class _Context:
    async def abort_with_status(self, status: Any) -> None:
        raise _Aborted(status)


class _Host:
    def __init__(self) -> None:
        self.calls: list[_Call] = []
        self.runtime = SimpleNamespace(instance_id="w1")

    @contextlib.asynccontextmanager
    async def tracked(self) -> AsyncIterator[_Call]:
        call = _Call(asyncio.current_task())
        self.calls.append(call)
        yield call


class _Role:
    """The role's stream: one message now, the next when ``more`` is set."""

    def __init__(self) -> None:
        self.more = asyncio.Event()
        self.closed = False

    async def stream(self) -> AsyncIterator[int]:
        try:
            yield 1
            await self.more.wait()
            yield 2
        finally:
            self.closed = True


async def _serve(relay: Relay, role: _Role, sending: asyncio.Event,
                 release: asyncio.Event) -> list[int]:
    """grpc's side: after each message, a send that takes until ``release``."""
    got = []
    async for msg in relay.stream(role.stream(), _Context(), "decode"):  # type: ignore[arg-type]
        got.append(msg)
        sending.set()
        await release.wait()
    return got


def _drained(e: pytest.ExceptionInfo[_Aborted]) -> None:
    assert e.value.status.code == grpc.StatusCode.ABORTED
    assert "drained" in e.value.status.details


async def test_a_drain_during_a_send_waits_for_the_send_then_aborts() -> None:
    host, role, sending, release = _Host(), _Role(), asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(_serve(Relay(host), role, sending, release))  # type: ignore[arg-type]
    await sending.wait()  # the first message is being sent
    host.calls[0].abort()
    await asyncio.sleep(0.01)
    assert not task.done() and task.cancelling() == 0  # the send is left alone
    release.set()
    with pytest.raises(_Aborted) as e:
        await task
    _drained(e)
    assert role.closed


async def test_a_drain_while_waiting_for_the_next_token_cancels_and_aborts() -> None:
    host, role, sending, release = _Host(), _Role(), asyncio.Event(), asyncio.Event()
    release.set()
    task = asyncio.create_task(_serve(Relay(host), role, sending, release))  # type: ignore[arg-type]
    await sending.wait()
    await asyncio.sleep(0.01)  # now waiting on the role's stream for message 2
    assert host.calls[0].interruptible
    host.calls[0].abort()
    with pytest.raises(_Aborted) as e:
        await task
    _drained(e)
    assert role.closed and task.cancelling() == 0  # the cancel was taken back


async def test_a_call_that_ends_before_any_drain_is_untouched() -> None:
    host, role, sending, release = _Host(), _Role(), asyncio.Event(), asyncio.Event()
    release.set()
    role.more.set()
    got = await _serve(Relay(host), role, sending, release)  # type: ignore[arg-type]
    assert got == [1, 2] and role.closed and not host.calls[0].aborted


async def test_a_drain_ends_every_call_even_one_whose_caller_stopped_reading(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole drain (RoleHost._drain, registry calls off): a call waiting for its next
    token ends with the status; a call stuck in a send longer than STUCK_SEND_S is
    cancelled as the last resort, so the drain ends and nothing stays tracked."""
    from services.worker import host as host_mod

    monkeypatch.setattr(host_mod, "STUCK_SEND_S", 0.05)
    rt = SimpleNamespace(redis=None, instance_id="w1", registration=None)
    host = host_mod.RoleHost(host_mod.HostConfig(), rt)  # type: ignore[arg-type]
    host.removed = True  # no registry records: _register returns at once
    host.state = host_mod.State.SERVING
    relay = Relay(host)
    waiting, stuck = _Role(), _Role()
    s1, never = asyncio.Event(), asyncio.Event()
    s2, release = asyncio.Event(), asyncio.Event()
    release.set()
    stuck_task = asyncio.create_task(_serve(relay, stuck, s1, never))
    waiting_task = asyncio.create_task(_serve(relay, waiting, s2, release))
    await s1.wait()
    await s2.wait()
    await asyncio.sleep(0.01)
    await asyncio.wait_for(host._drain(0.01), 5.0)
    assert host.state is host_mod.State.DRAINED and host.in_flight == 0
    assert host.aborted_on_drain_total == 2
    with pytest.raises(_Aborted) as e:
        await waiting_task
    _drained(e)
    assert stuck_task.cancelled() and stuck.closed and waiting.closed
    host.steps.stop()
