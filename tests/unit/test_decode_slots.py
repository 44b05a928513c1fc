"""services.decode.slots: the FIFO of requests waiting for a decode slot."""

from __future__ import annotations

import asyncio

import pytest

from services.decode.slots import SlotWaiters

pytestmark = pytest.mark.unit


async def test_freed_slots_go_to_the_longest_waiter_first() -> None:
    w = SlotWaiters()
    order: list[str] = []

    async def waiter(name: str) -> None:
        assert await w.wait(5.0)
        order.append(name)

    tasks = [asyncio.create_task(waiter(n)) for n in "abc"]
    await asyncio.sleep(0)
    assert len(w) == 3
    for _ in range(3):
        w.wake_one()
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c"] and len(w) == 0


async def test_timeout_and_a_wake_with_nobody_waiting() -> None:
    w = SlotWaiters()
    w.wake_one()  # nobody waits: nothing is kept for later
    assert not await w.wait(0.01)
    assert len(w) == 0


async def test_a_waiter_that_lost_its_slot_keeps_its_place() -> None:
    w = SlotWaiters()
    late = asyncio.create_task(w.wait(5.0))
    await asyncio.sleep(0)
    front = asyncio.create_task(w.wait(5.0, front=True))
    await asyncio.sleep(0)
    w.wake_one()
    assert await asyncio.wait_for(front, 1.0)
    await asyncio.sleep(0.01)
    assert not late.done()
    w.wake_one()
    assert await late


async def test_a_cancelled_waiter_passes_its_hand_off_on() -> None:
    w = SlotWaiters()
    first = asyncio.create_task(w.wait(5.0))
    second = asyncio.create_task(w.wait(5.0))
    await asyncio.sleep(0)
    w.wake_one()  # handed to `first`, which is cancelled before it runs
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await asyncio.wait_for(second, 1.0)  # the slot was not lost
    assert len(w) == 0
