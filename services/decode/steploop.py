"""The decode step loop: one thread steps every active sequence in turn.

It is the only thread of the process that runs torch: two threads driving torch
means two OpenMP teams whose idle workers spin against each other (measured
10-25% slower steps on 2 cores). Other model work (loading, KV unpacking) is
queued with ``run`` and executed between steps.

The model thread never waits on the event loop: it pushes each token into the
sequence's asyncio queue with ``call_soon_threadsafe`` and goes straight on to
the next step. The gRPC side drains the queue (coalescing tokens that piled up
into one message). Cancellation sets a flag the loop checks before each step;
the sequence's cache is dropped as soon as it leaves the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from services.engine.runner import ModelRunner
    from services.engine.sampling import Sampling

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class DecodeSequence:
    request_id: str
    cache: Any
    token: int
    params: Sampling
    max_new_tokens: int
    stop_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[tuple[int, bool] | BaseException] = field(default_factory=asyncio.Queue)
    produced: int = 0
    cancelled: bool = False


class StepLoop:
    def __init__(self) -> None:
        self.runner: ModelRunner | None = None  # set once loaded on this thread
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._active: list[DecodeSequence] = []
        self._cv = threading.Condition()
        self._stopped = False
        self.steps_total = 0
        self.step_seconds_total = 0.0
        self._thread = threading.Thread(target=self._run, name="decode-steps", daemon=True)
        self._thread.start()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the loop thread, between steps."""
        fut: Future[T] = Future()
        with self._cv:
            self._jobs.append((lambda: fn(*args), fut))
            self._cv.notify()
        return await asyncio.wrap_future(fut)

    def submit(self, seq: DecodeSequence) -> None:
        with self._cv:
            self._active.append(seq)
            self._cv.notify()

    def cancel(self, seq: DecodeSequence) -> None:
        seq.cancelled = True  # read by the loop thread before the sequence's next step

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=10)

    @property
    def active(self) -> int:
        return len(self._active)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._active and not self._jobs and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    for _, fut in self._jobs:
                        fut.cancel()
                    return
                jobs = list(self._jobs)
                self._jobs.clear()
                batch = list(self._active)
            for job, fut in jobs:
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(job())
                    except BaseException as e:
                        fut.set_exception(e)
            assert self.runner is not None or not batch
            if batch and hasattr(self.runner, "batch_contexts"):
                # The mock engine prices a step by the whole round's contexts.
                self.runner.batch_contexts = [getattr(s.cache, "length", 0) for s in batch]
            for seq in batch:
                if seq.cancelled:
                    self._finish(seq)
                    continue
                t0 = time.perf_counter()
                try:
                    seq.token = self.runner.decode_step(seq.token, seq.cache, seq.params)
                except Exception as e:  # surfaced to the request, the loop keeps serving
                    log.exception("decode step failed for %s", seq.request_id)
                    seq.loop.call_soon_threadsafe(seq.queue.put_nowait, e)
                    self._finish(seq)
                    continue
                self.steps_total += 1
                self.step_seconds_total += time.perf_counter() - t0
                seq.produced += 1
                done = seq.token in seq.stop_ids or seq.produced >= seq.max_new_tokens
                seq.loop.call_soon_threadsafe(seq.queue.put_nowait, (seq.token, done))
                if done:
                    self._finish(seq)

    def _finish(self, seq: DecodeSequence) -> None:
        with self._cv:
            if seq in self._active:
                self._active.remove(seq)
        seq.cache = None  # free the KV now, not when the gRPC side lets go of the object
