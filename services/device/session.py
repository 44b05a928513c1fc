"""One chat on the device: cloud stream, catch-up prefill, hand-off, paced display.

Three concurrent parts share one state (single event loop, so every state change
between two awaits is atomic):
  - ``_read_cloud``: the GenerationService stream (through the WAN relay). Cloud tokens
    go to the display buffer (the speed controller) until the hand-off; later ones are
    dropped. P' (the refined prompt) arrives just after the first token.
  - ``_device``: the device's own work. It prefills its prompt (P, or P' once it
    arrived) and then the received cloud tokens, in chunks (Reconciler). After each
    chunk, if its cache covers every displayed token it hands off: the display buffer
    is cut at the cache end, the cloud call is cancelled (termination; the cloud frees
    slot and KV), and the device decodes from the chunk's last logits.
  - ``display``: the speed controller releases buffered tokens at its pace; each
    batch goes to the user with its display time.
Modes: pd_device (all three), cloud_only (the device part only starts if the cloud
fails: local fallback), device_only (no cloud).
Stop strings: each produced token (either side) also feeds a detokenizer; when the text
holds a stop string, production ends there (the cloud call is cancelled, the device
stops decoding) and the display's own detokenizer cuts the text before it.
Sampling: the cloud gets the chat's temperature/top-p/seed, and the device's engine
samples with the same (seed, position) rule, so a seeded answer does not depend on
where the hand-off fell.
Fallback: a cloud error, a broken stream, no first token within ``cloud_timeout_s``,
or no further message within ``cloud_stall_s`` (a cloud gone silent without closing
the connection) cancels the call, records why (``fallback``), and the device
finishes the answer from its own prefill of P (or P' if it already had it) plus the
tokens already received. The user's stream stays coherent either way. A cloud error
that arrives after the hand-off is still recorded; the device's own cancel is not one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, cast

import grpc

from pdserve.v1 import common_pb2
from pdserve.v1 import device_service_pb2 as dpb
from pdserve.v1 import generation_service_pb2 as gpb
from services.device.controller import ControllerConfig, SpeedController, percentile
from services.device.handoff import Reconciler
from services.engine.sampling import Sampling
from services.engine.worker import ModelThread
from services.model.tokenizer import Detokenizer, TextTokenizer

log = logging.getLogger(__name__)
CLOUD, DEVICE = dpb.TOKEN_SOURCE_CLOUD, dpb.TOKEN_SOURCE_DEVICE


@dataclass(frozen=True)
class RunSettings:
    mode: int  # DeviceMode
    max_tokens: int
    n_budget: int = 0
    rho: float = 1.0
    tau_ms: float = 30.0
    chunk_tokens: int = 128
    cloud_timeout_s: float = 10.0
    rtt_ms: float = 0.0
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    # Pace of the device's own tokens after the hand-off (0: keep the plan's pace). The
    # plan's slow pace only exists to give the catch-up prefill time; once it is done,
    # the display can step down to the device's TPOT.
    local_pace_ms: float = 0.0
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    cloud_stall_s: float = 10.0  # no cloud message for this long mid-stream: fallback


class ChatRun:
    def __init__(self, engine: Any, thread: ModelThread, stub: Any, ids: list[int],
                 eos_ids: tuple[int, ...], s: RunSettings, request_id: str,
                 tok: TextTokenizer | None = None) -> None:
        self.engine, self.thread, self.stub = engine, thread, stub
        self._tok = tok
        self._stop_detok = Detokenizer(tok, s.stop) if s.stop and tok is not None else None
        self._produced: list[int] = []  # the answer so far, as the stop check saw it
        self.stop_hit = False  # a stop string ended the answer
        self.ids, self.eos, self.s, self.rid = ids, set(eos_ids), s, request_id
        self.t0 = time.monotonic()
        self.ctl = SpeedController(s.controller)
        self._src: deque[int] = deque()
        self._wake = asyncio.Event()
        self._cloud_news = asyncio.Event()
        self.cloud_tokens: list[int] = []
        self.cloud_arrivals: list[float] = []  # ms, for the planner's cloud TPOT estimate
        self.refined: list[int] | None = None
        self.refine_method = ""
        self.cloud_finished = False  # the cloud ended its stream normally
        self.cloud_complete = False  # ... and its answer is the whole answer
        self.fallback = ""
        self.handed_off: int | None = None
        self.handoff_ms = 0.0
        self.dropped = 0
        self.cloud_busy_ms = 0.0
        self.device_compute_ms = 0.0
        # Catch-up prefill as it really ran (wall time of the chunks, waits excluded), for
        # the planner's device update: tokens prefilled, chunks, ms.
        self.catchup_tokens = 0
        self.catchup_chunks = 0
        self.catchup_wall_ms = 0.0
        self.produced_all = False
        self.shown: list[tuple[int, float, int]] = []
        self._call: Any = None
        self._sent_at = 0.0
        self._tasks: list[asyncio.Task[None]] = []

    # -- shared ---------------------------------------------------------------------------
    def now_ms(self) -> float:
        return (time.monotonic() - self.t0) * 1e3

    def _push(self, token: int, source: int) -> None:
        if self.stop_hit:
            return  # the answer already ended at a stop string
        self.ctl.push(token, self.now_ms())
        self._src.append(source)
        self._wake.set()
        if self._stop_detok is not None:
            self._produced.append(token)
            self._stop_detok.add([token])
            if self._stop_detok.stopped:
                self.stop_hit = True
                self.produced_all = True
                self._stop_cloud()

    def _answer_len(self) -> int:
        return self.ctl.displayed + self.ctl.buffered

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self.s.mode != dpb.DEVICE_MODE_DEVICE_ONLY:
            self._tasks.append(loop.create_task(self._read_cloud()))
        self._tasks.append(loop.create_task(self._device()))

    async def close(self) -> None:
        self._stop_cloud()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def display(self) -> AsyncIterator[list[tuple[int, float, int]]]:
        """Batches of (token, display_ms, source), as the controller releases them."""
        while True:
            for t in self._tasks:  # a producer that crashed ends the chat with its error
                if t.done() and not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if self.produced_all:
                self.ctl.end()  # a held first token need not wait for a second one
            out = self.ctl.pop_due(self.now_ms())
            if out:
                now = self.now_ms()
                batch = [(tok, now, self._src.popleft()) for tok, _ in out]
                self.shown.extend(batch)
                yield batch
            if self.produced_all and self.ctl.buffered == 0:
                return
            due = self.ctl.next_release()
            self._wake.clear()
            timeout = None if due is None else max(0.0, (due - self.now_ms()) / 1e3)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    # -- cloud ----------------------------------------------------------------------------
    def _stop_cloud(self) -> None:
        if self._call is not None and not self._call.done():
            self._call.cancel()
            # The cancel reaches the cloud one-way later, as the request did: they cancel.
            self.cloud_busy_ms = (time.monotonic() - self._sent_at) * 1e3

    async def _read_cloud(self) -> None:
        s = self.s
        req = gpb.GenerateRequest(prompt_token_ids=self.ids, max_tokens=s.max_tokens,
                                  request_id=self.rid, temperature=s.sampling.temperature,
                                  stop=list(s.stop))
        if s.sampling.temperature > 0:
            req.top_p = s.sampling.top_p
            if s.sampling.seed is not None:
                req.seed = s.sampling.seed
        if s.mode == dpb.DEVICE_MODE_PD_DEVICE:
            req.device_assist.token_budget = max(1, s.n_budget)
            req.device_assist.refine_ratio = s.rho if s.rho < 1.0 else 0.0
        self._sent_at = time.monotonic()
        self._call = self.stub.Generate(req)
        last_msg = self._sent_at
        finish = 0
        try:
            it = self._call.__aiter__()
            async with asyncio.timeout(s.cloud_timeout_s):
                first = await anext(it)
            async for msg in _chain(first, _stalling(it, s.cloud_stall_s)):
                last_msg = time.monotonic()
                if msg.refined_prompt_token_ids:
                    self.refined = list(msg.refined_prompt_token_ids)
                    self.refine_method = msg.refine_method
                for tok in msg.token_ids:
                    if self.handed_off is not None or self.stop_hit:
                        self.dropped += 1
                        continue
                    self.cloud_tokens.append(int(tok))
                    self.cloud_arrivals.append(self.now_ms())
                    self._push(int(tok), CLOUD)
                finish = msg.finish_reason or finish
                self._cloud_news.set()
            self.cloud_finished = True
            self.cloud_busy_ms = max(0.0, (last_msg - self._sent_at) * 1e3 - s.rtt_ms)
            n = len(self.cloud_tokens)
            self.cloud_complete = self.handed_off is None and (
                finish == common_pb2.FINISH_REASON_STOP or n >= s.max_tokens
                or (n > 0 and self.cloud_tokens[-1] in self.eos))
            if self.cloud_complete:
                self.produced_all = True
                self._wake.set()
        except TimeoutError:
            self._fail(f"no message from the cloud within {s.cloud_stall_s:g} s" if last_msg
                       > self._sent_at else
                       f"no first token from the cloud within {s.cloud_timeout_s:g} s")
        except grpc.aio.AioRpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED or (self.handed_off is None
                                                           and not self.stop_hit):
                self._fail(f"cloud {e.code().name}: {e.details()}")
        except StopAsyncIteration:
            self._fail("the cloud closed the stream without a token")
        finally:
            self._cloud_news.set()

    def _fail(self, why: str) -> None:
        if self.cloud_complete:
            return
        # After the hand-off the answer no longer needs the cloud, but a cloud that refused
        # or broke (a wrong API key, an outage) still shows: a device that prefills faster
        # than the cloud answers would otherwise run every chat alone without a word.
        taken = self.handed_off is not None or self.stop_hit
        self.fallback = f"{why}; " + ("the device had already taken over" if taken
                                      else "the device continues with local prefill")
        log.warning("request %s: %s", self.rid, self.fallback)
        if taken:
            return
        self._stop_cloud()
        self.cloud_finished = True

    # -- device ---------------------------------------------------------------------------
    async def _device_prompt(self) -> list[int]:
        """P right away (rho = 1, or no cloud), else P' once the cloud sent it; the
        cloud failing first means P after all."""
        if self.s.mode == dpb.DEVICE_MODE_CLOUD_ONLY:
            while not self.cloud_finished:  # the device only steps in if the cloud fails
                await self._news()
            if not self.fallback:
                return []
        if self.s.mode != dpb.DEVICE_MODE_PD_DEVICE or self.s.rho >= 1.0:
            return self.ids
        while self.refined is None and not self.cloud_finished:
            await self._news()
        return self.refined if self.refined is not None else self.ids

    async def _news(self) -> None:
        self._cloud_news.clear()
        await self._cloud_news.wait()

    async def _device(self) -> None:
        try:
            await self._catch_up_and_decode()
        finally:
            self.produced_all = True
            self._wake.set()

    async def _catch_up_and_decode(self) -> None:
        prompt = await self._device_prompt()
        if not prompt or self.cloud_complete or self.stop_hit:
            return
        sess = self.engine.new_session(self.s.sampling)
        rec = Reconciler(len(prompt), chunk=self.s.chunk_tokens)
        pred = -1
        while True:
            while len(rec.received) < len(self.cloud_tokens):
                rec.receive(len(rec.received) + 1, self.cloud_tokens[len(rec.received)])
            if self.cloud_complete or self.stop_hit:
                return  # the cloud's answer is the whole answer
            if rec.can_hand_off(self.ctl.displayed):
                break
            start, chunk = rec.next_chunk(prompt)
            if not chunk:
                await self._news()
                continue
            t0 = time.monotonic()
            pred = await self.thread.run(self.engine.prefill_chunk, sess, chunk)
            self.catchup_wall_ms += (time.monotonic() - t0) * 1e3
            self.catchup_chunks += 1
            rec.chunk_done(start, len(chunk))
        # Hand-off (atomic: no await until the buffer is cut and the cloud is told).
        c, keep = rec.hand_off(self.ctl.displayed)
        self.catchup_tokens = rec.cached
        self.handed_off = c
        self.handoff_ms = self.now_ms()
        dropped = self.ctl.drop_buffered(keep)
        for _ in dropped:
            self._src.pop()
        self.dropped += len(dropped)
        if self._stop_detok is not None and dropped:  # the stop check saw them: rewind
            del self._produced[len(self._produced) - len(dropped):]
            self._stop_detok = Detokenizer(self._tok, self.s.stop)  # type: ignore[arg-type]
            self._stop_detok.add(self._produced)
        self._stop_cloud()
        if self.s.local_pace_ms > 0:
            # The gain stays: a few buffered local tokens still absorb the device's own
            # hiccups (a bench run with gain 0 showed 68 ms gaps from them).
            self.ctl.retarget(self.s.local_pace_ms)
        total = c
        while total < self.s.max_tokens:
            rec.device_token(pred)
            self._push(pred, DEVICE)
            total += 1
            if pred in self.eos or total >= self.s.max_tokens or self.stop_hit:
                break
            pred = await self.thread.run(self.engine.decode, sess, pred)
        self.device_compute_ms = sess.compute_ms

    # -- result ---------------------------------------------------------------------------
    def cloud_tpot_ms(self) -> float:
        """Mean gap between cloud tokens as they arrived, without the t1 -> t2 gap (the
        cloud's KV handoff): the cloud's TPOT as this device sees it; 0 if unknown."""
        a = self.cloud_arrivals[1:]
        return (a[-1] - a[0]) / (len(a) - 1) if len(a) > 2 else 0.0

    def summary(self, mode: int) -> dpb.ChatSummary:
        times = [t for _, t, _ in self.shown]
        g = [b - a for a, b in itertools.pairwise(times)]
        toks = [t for t, _, _ in self.shown]
        finish = common_pb2.FINISH_REASON_STOP if self.stop_hit or (toks and toks[-1] in
                                                                     self.eos) \
            else common_pb2.FINISH_REASON_LENGTH
        return dpb.ChatSummary(
            mode=cast(Any, mode), finish_reason=finish, ttft_ms=times[0] if times else 0.0,
            mean_tpot_ms=sum(g) / len(g) if g else 0.0, p99_tpot_ms=percentile(g, 99),
            max_tpot_ms=max(g, default=0.0), handoff_index=self.handed_off or 0,
            handoff_ms=self.handoff_ms, cloud_tokens=len(self.cloud_tokens),
            cloud_tokens_dropped=self.dropped, cloud_busy_ms=self.cloud_busy_ms,
            token_budget=self.s.n_budget, refine_ratio=self.s.rho, tau_ms=self.s.tau_ms,
            prompt_tokens=len(self.ids),
            refined_prompt_tokens=len(self.refined) if self.refined else len(self.ids),
            refine_method=self.refine_method, fallback=self.fallback,
            device_prefill_ms=self.device_compute_ms, e2e_ms=self.now_ms(),
            first_token_hold_ms=self.s.controller.first_hold_ms, tokens=len(toks))


async def _stalling(it: AsyncIterator[Any], stall_s: float) -> AsyncIterator[Any]:
    """``it``, raising TimeoutError when the next item takes longer than ``stall_s``."""
    while True:
        try:
            async with asyncio.timeout(stall_s):
                x = await anext(it)
        except StopAsyncIteration:
            return
        yield x


async def _chain(first: Any, rest: AsyncIterator[Any]) -> AsyncIterator[Any]:
    yield first
    async for x in rest:
        yield x


def default_stub_factory(channel: grpc.aio.Channel) -> Any:
    from pdserve.v1 import generation_service_pb2_grpc

    return generation_service_pb2_grpc.GenerationServiceStub(channel)
