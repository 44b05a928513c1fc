"""Stopping background tasks reliably."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[Any] | None, timeout_s: float = 5.0) -> None:
    """Cancel ``task`` and wait until it has ended.

    The cancel is repeated while waiting: a library may swallow a CancelledError that
    lands in the middle of its own I/O (redis-py's connection code can), which leaves
    the task running on, in its next ``sleep``, and a plain ``cancel(); await task``
    waiting forever. After ``timeout_s`` the task is abandoned with a warning rather
    than hanging shutdown.
    """
    if task is None or task.done():
        return
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.05)
        if loop.time() > give_up:
            log.warning("background task %s did not stop within %.1f s", task.get_name(),
                        timeout_s)
            return
    with contextlib.suppress(asyncio.CancelledError, Exception):
        task.result()
