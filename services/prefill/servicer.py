"""The prefill servicer: admission into ``slots`` (b_p), early intervention, the
compute on the model thread, then the KV handoff (``handoff``); stats and load.

Lifecycle of a request (``Prefill``, server-streaming):
  1. Admission: take one of ``slots``. When all are busy, ADMISSION_MODE_QUEUE
     waits in a local FIFO; ADMISSION_MODE_REJECT_IF_BUSY answers ``rejected`` at
     once (the gateway forwards elsewhere). A request already past its TTFT
     deadline, or one this worker cannot prefill before it (``PrefillEstimator``),
     ends with DEADLINE_EXCEEDED before compute (early intervention).
  2. Reserve the KV at a kvstore (a full kvstore is a rejection), ``accepted``, forward
     pass, ``first_token``. The deadline is checked again after compute. The forward
     reuses the KV of the longest cached prompt prefix and computes only the rest; the
     KV handed to decode is still whole. Prompts of different requests are not batched
     into one forward: on 2 CPU cores that measured no faster than running them one
     after another (docs/engine.md).
  3. Push the KV as one contiguous buffer, then ``kv_ready`` with the KvRef. The slot is
     held until here.
  Cancellation or failure at any step releases the reservation at the kvstore, even
  a cancel while ReserveKv is still in flight (``Handoff.reserve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING

import grpc

from pdserve.v1 import prefill_service_pb2 as pb
from pdserve.v1 import prefill_service_pb2_grpc as pb_grpc
from services.cluster import slotoffer
from services.common import faultpoints
from services.common.errors import DeadlineExceeded, InvalidArgument, PdserveError, abort_with
from services.common.runtime import ServiceRuntime
from services.engine.worker import ModelThread, WorkerConfig, now_ms
from services.kv import transfer_load
from services.kv.wire import MAX_REQUEST_ID_BYTES
from services.observe.telemetry import ATTR_PROMPT_TOKENS, ATTR_REQUEST_ID, tracer
from services.prefill.estimator import PrefillEstimator
from services.prefill.handoff import Handoff, Staged

if TYPE_CHECKING:
    from services.engine.base import KvState, OnLayer, Runner
    from services.engine.sampling import Sampling

_tracer = tracer(__name__)


class PrefillServicer(pb_grpc.PrefillServiceServicer):
    def __init__(self, cfg: WorkerConfig, runtime: ServiceRuntime, runner: Runner,
                 thread: ModelThread, handoff: Handoff) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.runner = runner
        self.thread = thread
        self.handoff = handoff
        self.slots = asyncio.Semaphore(cfg.slots)
        self.busy = 0
        self.queued = 0
        self.draining = False
        self.stats = pb.GetPrefillStatsResponse(instance_id=runtime.instance_id, slots=cfg.slots)
        self.estimator = PrefillEstimator()
        self._background: set[asyncio.Task[None]] = set()

    def _check(self, request: pb.PrefillRequest) -> None:
        if not request.request_id or len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidArgument(f"request_id of 1 to {MAX_REQUEST_ID_BYTES} bytes is required")
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidArgument("prompt_token_ids is empty")
        vocab = self.runner.info.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise InvalidArgument(f"token ids must be in [0, {vocab})")
        if len(ids) >= self.runner.info.max_context:
            raise InvalidArgument(f"prompt of {len(ids)} tokens does not fit the context "
                                  f"of {self.runner.info.max_context}")

    @staticmethod
    def _deadline_passed(request: pb.PrefillRequest, when: str) -> None:
        if request.ttft_deadline_unix_ms and now_ms() >= request.ttft_deadline_unix_ms:
            raise DeadlineExceeded(
                f"TTFT deadline passed {when} prefill; the request was ended early",
                metadata={"request_id": request.request_id},
            )

    def _deadline_unreachable(self, request: pb.PrefillRequest) -> None:
        """Early intervention by prediction: spending the slot on a prefill that cannot end
        before the deadline only makes the requests behind it miss theirs too."""
        if not (self.cfg.predictive_deadline and request.ttft_deadline_unix_ms):
            return
        n = len(request.prompt_token_ids)
        need = self.estimator.lower_bound_ms(n)
        left = request.ttft_deadline_unix_ms - now_ms()
        if need > left:
            self.stats.unreachable_total += 1
            raise DeadlineExceeded(
                f"the prefill of {n} tokens needs at least {need:.0f} ms here but only "
                f"{max(left, 0):.0f} ms remain before the TTFT deadline; ended early",
                reason="DEADLINE_UNREACHABLE", metadata={"request_id": request.request_id})

    async def Prefill(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PrefillResponse]:
        try:
            self._check(request)
            self._deadline_passed(request, "before")
        except PdserveError as e:
            await abort_with(context, e)
        reject = request.admission_mode == pb.ADMISSION_MODE_REJECT_IF_BUSY
        if self.draining:
            self.stats.rejected_total += 1
            yield pb.PrefillResponse(rejected=pb.PrefillRejected(
                reason=pb.REJECT_REASON_DRAINING, message="instance is draining"))
            return
        if reject and self.slots.locked():
            self.stats.rejected_total += 1
            yield pb.PrefillResponse(rejected=pb.PrefillRejected(
                reason=pb.REJECT_REASON_SLOTS_FULL, message=f"all {self.cfg.slots} slots busy"))
            return
        t_arrive = time.monotonic()
        self.queued += 1
        try:
            await self.slots.acquire()
        finally:
            self.queued -= 1
        self.busy += 1
        try:
            run = self._run(request, context, (time.monotonic() - t_arrive) * 1e3)
            rejected = False
            async with contextlib.aclosing(run) as events:
                async for msg in events:
                    rejected = msg.WhichOneof("event") == "rejected"
                    yield msg
            if not rejected:
                self.stats.completed_total += 1
        except asyncio.CancelledError:
            self.stats.cancelled_total += 1
            raise
        except PdserveError as e:
            self.stats.failed_total += 1
            await abort_with(context, e)
        finally:
            self.busy -= 1
            self.slots.release()
            self._announce_free_slot()

    async def _run(
        self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext, queue_ms: float
    ) -> AsyncGenerator[pb.PrefillResponse, None]:
        from services.engine.refine import probe_for, refined_prompt
        from services.engine.sampling import Sampling

        rid = request.request_id
        ids = list(request.prompt_token_ids)
        self._deadline_passed(request, "before")
        self._deadline_unreachable(request)
        await faultpoints.pause("prefill.before_reserve")
        staged: Staged | None = None
        if not request.first_token_only:  # else no decode follows: no KV to stage
            got = await self.handoff.reserve(request, self.estimator)
            if isinstance(got, pb.PrefillRejected):
                self.stats.rejected_total += 1
                yield pb.PrefillResponse(rejected=got)
                return
            staged = got
        try:
            await faultpoints.pause("prefill.after_reserve")
            self.stats.accepted_total += 1
            yield pb.PrefillResponse(accepted=pb.PrefillAccepted(
                instance_id=self.runtime.instance_id, queue_ms=queue_ms))
            sp = request.sampling
            params = Sampling(sp.temperature, sp.top_p or 1.0,
                              sp.seed if sp.HasField("seed") else None)
            with _tracer.start_as_current_span("prefill.compute") as span:
                span.set_attribute(ATTR_REQUEST_ID, rid)
                span.set_attribute(ATTR_PROMPT_TOKENS, len(ids))
                t0 = time.monotonic()
                probe = probe_for(self.runner, request.refine_ratio)  # P/D-Device
                hook: tuple[object, ...] = ()
                if probe is None and staged is not None:
                    await staged.open_layered(len(ids))
                    hook = staged.hook()
                first, cache = await self.thread.run(
                    probe.wrap(self._compute) if probe else self._compute,
                    ids, params, probe is None, *hook)
                prefill_ms = (time.monotonic() - t0) * 1e3
            self.estimator.observe(len(ids), prefill_ms)
            self._deadline_passed(request, "after")
            t_first = time.monotonic()
            yield pb.PrefillResponse(first_token=pb.FirstToken(token_id=first,
                                                               prefill_ms=prefill_ms))
            if request.refine_ratio > 0:  # P/D-Device: P' right after the first token
                kept, method, refine_ms = await self.thread.run(
                    refined_prompt, probe, cache, ids, request.refine_ratio)
                yield pb.PrefillResponse(refined=pb.RefinedPrompt(
                    token_ids=kept, method=method, refine_ms=refine_ms))
            if staged is None:
                return
            kv = await staged.push(cache, context.time_remaining())
            del cache
            await faultpoints.pause("prefill.after_push")
            stage_ms = (time.monotonic() - t_first) * 1e3
            handed_off = False
            try:
                yield pb.PrefillResponse(kv_ready=pb.KvReady(kv=kv, kv_stage_ms=stage_ms))
                handed_off = True
            finally:
                if not handed_off:
                    await staged.release("cancelled before handoff")
        except BaseException:
            if staged is not None:
                await staged.release("prefill failed or was cancelled")
            raise
        # From here the gateway owns the KV: it releases it by handle, or by request id if
        # the KvRef never reached it.
        await faultpoints.pause("prefill.after_kv_ready")

    def _compute(self, ids: list[int], params: Sampling, reuse_prefix: bool = True,
                 on_layer: OnLayer | None = None) -> tuple[int, KvState]:
        # A probed prefill must see the whole prompt's forward: no prefix reuse then.
        out = self.runner.prefill(ids, params, reuse_prefix, on_layer)
        if self.cfg.emulate_prefill_ms_per_token > 0:
            time.sleep(len(ids) * self.cfg.emulate_prefill_ms_per_token / 1000.0)
        return out

    def offer_free_slots(self) -> None:
        """Offer every free slot at once: when this prefill becomes routable (start, a role
        or group switch), requests may already wait in the group's queue, and a slot is
        otherwise offered only when a request ends (or by a gateway's 1 s safety poll)."""
        for _ in range(max(0, self.cfg.slots - self.busy)):
            self._announce_free_slot()

    def _announce_free_slot(self) -> None:
        """Offer the freed slot to the earliest-deadline request waiting in this group's
        forwarding queue: one Redis round trip, which wakes exactly that request's gateway
        (services/cluster/slotoffer.py). Without Redis, gateways fall back to local waiting."""
        async def publish() -> None:
            with contextlib.suppress(Exception):
                await slotoffer.offer_slot(self.runtime.redis, self.cfg.group,
                                           self.runtime.instance_id)

        task = asyncio.get_running_loop().create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def GetPrefillStats(
        self, request: pb.GetPrefillStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPrefillStatsResponse:
        out = pb.GetPrefillStatsResponse()
        out.CopyFrom(self.stats)
        out.busy_slots = self.busy
        out.queued = self.queued
        return out

    def load(self) -> dict[str, float]:
        return {"busy": float(self.busy), "queued": float(self.queued),
                "slots": float(self.cfg.slots), **transfer_load(),
                **self.runner.prefix_metrics()}
