"""The decode step loop: continuous batching on the one thread that runs torch.

Each iteration runs the queued model jobs (loading, RecvScatter of arrived KV), then
ONE batched forward over every active sequence (``runner.decode_batch``): each is fed
its last token at its own position over its own blocks of the paged KV pool. A
sequence submitted while a step runs joins at the next step; one that finishes (stop
token, max_new_tokens) or is cancelled leaves at once and its blocks go back to the
pool, so the next ready request can take them (P/D-Serve's asynchronous retrieval).

It is the only thread of the process that runs torch: two threads driving torch
means two OpenMP teams whose idle workers spin against each other (measured 10-25%
slower steps on 2 cores).

The model thread never waits on the event loop: it pushes each token into the
sequence's asyncio queue with ``call_soon_threadsafe`` and goes straight on to the
next step. The gRPC side drains the queue (coalescing tokens that piled up into one
message). Cancellation sets a flag the loop reads before each step.
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
    from services.engine.paged import BlockAllocator, BlockTable
    from services.engine.sampling import Sampling

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class DecodeSequence:
    request_id: str
    state: Any  # the runner's per-request decode state (PagedSeq, or the mock's)
    table: BlockTable | None  # its blocks in the pool, freed when it leaves
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
        self.runner: Any = None  # set once loaded on this thread (ModelRunner or MockRunner)
        self.pool: BlockAllocator | None = None  # the runner's KV pool, once attached
        self._jobs: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._active: list[DecodeSequence] = []
        self._cv = threading.Condition()
        self._stopped = False
        self.steps_total = 0  # batched forwards
        self.tokens_total = 0  # tokens they produced (sum of batch sizes)
        self.step_seconds_total = 0.0
        self.max_batch = 0
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
        """Join the batch at the next step."""
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
            for seq in [s for s in batch if s.cancelled]:
                self._finish(seq)
            batch = [s for s in batch if not s.cancelled]
            if batch:
                self._step(batch)

    def _step(self, batch: list[DecodeSequence]) -> None:
        t0 = time.perf_counter()
        try:
            tokens = self.runner.decode_batch([s.token for s in batch],
                                              [s.state for s in batch],
                                              [s.params for s in batch])
        except Exception as e:  # surfaced to every request of the step; the loop keeps serving
            log.exception("decode step failed for a batch of %d", len(batch))
            for seq in batch:
                seq.loop.call_soon_threadsafe(seq.queue.put_nowait, e)
                self._finish(seq)
            return
        self.steps_total += 1
        self.tokens_total += len(batch)
        self.max_batch = max(self.max_batch, len(batch))
        self.step_seconds_total += time.perf_counter() - t0
        for seq, token in zip(batch, tokens, strict=True):
            seq.token = token
            seq.produced += 1
            done = token in seq.stop_ids or seq.produced >= seq.max_new_tokens
            seq.loop.call_soon_threadsafe(seq.queue.put_nowait, (token, done))
            if done:
                self._finish(seq)

    def _finish(self, seq: DecodeSequence) -> None:
        """Leave the batch and give the blocks back now (idempotent)."""
        with self._cv:
            if seq in self._active:
                self._active.remove(seq)
        if self.pool is not None:
            self.pool.free(seq.table)
        seq.state = None
