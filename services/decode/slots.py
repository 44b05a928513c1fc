"""Requests waiting for a decode slot, first come first served (pure asyncio, no I/O).

A decode that is full may hold a request for up to its ``wait_for_slot_ms`` instead of
refusing it at once. When a request that held a slot ends, ``wake_one`` hands the freed
slot to the longest waiter, which then takes it (re-checking slots and the KV pool: a
request that did not wait may have come in between; if it lost, it waits again at the
front). Newcomers queue behind earlier waiters, so the wait is FIFO and a freed slot is
taken as soon as the event loop runs the waiter: no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class SlotWaiters:
    def __init__(self) -> None:
        self._queue: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    async def wait(self, timeout_s: float, front: bool = False) -> bool:
        """Wait for a freed slot: True when handed one, False when ``timeout_s`` passed.
        ``front``: a waiter that was handed a slot and lost it keeps its place."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if front:
            self._queue.appendleft(fut)
        else:
            self._queue.append(fut)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(fut)
            return True
        except TimeoutError:
            return fut.done() and not fut.cancelled()  # handed one as the time ran out
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.wake_one()  # the call went away holding a hand-off: pass it on
            raise
        finally:
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                self._queue.remove(fut)

    def wake_one(self) -> None:
        """A slot was freed: hand it to the longest waiter still waiting."""
        while self._queue:
            fut = self._queue.popleft()
            if not fut.done():
                fut.set_result(None)
                return
