"""cancel_and_wait stops a task even when a library swallowed the first cancel."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.common.tasks import cancel_and_wait

pytestmark = pytest.mark.unit


async def test_a_swallowed_cancel_does_not_hang_shutdown() -> None:
    async def loop() -> None:
        while True:
            with contextlib.suppress(asyncio.CancelledError):  # like a library mid-I/O
                await asyncio.sleep(0.01)
            await asyncio.sleep(10)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.02)
    await asyncio.wait_for(cancel_and_wait(task), 2)
    assert task.done()


async def test_a_task_that_never_stops_is_abandoned_with_a_bounded_wait() -> None:
    stop = asyncio.Event()

    async def stubborn() -> None:
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await stop.wait()

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait(task, timeout_s=0.2), 2)
    assert not task.done()
    stop.set()  # leave nothing running for the loop's teardown
    await task


async def test_none_and_finished_tasks_return_at_once_and_keep_their_result() -> None:
    await asyncio.wait_for(cancel_and_wait(None), 1)

    async def answer() -> int:
        return 42

    t = asyncio.create_task(answer())
    await t
    await asyncio.wait_for(cancel_and_wait(t), 1)
    assert not t.cancelled() and t.result() == 42  # a finished task is not cancelled after
