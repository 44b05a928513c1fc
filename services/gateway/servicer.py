"""GenerationService.Generate: one request's path through the cluster.

  validate + tokenize -> scenario group -> admission (admission.py: forward upon
  rejection, or a queueing baseline) -> Prefill stream: accepted, first_token (streamed
  to the client at once), kv_ready(KvRef) -> least-loaded decode with a free slot
  (waiting while all are full) -> Decode stream (tokens relayed, detokenized, stop
  strings) -> final message with finish_reason and timings.

The gateway owns the request until it ends: on client cancel, error or stop it
cancels its downstream calls and releases any KV still staged at the kvstore.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import grpc

from pdserve.v1 import (
    common_pb2,
    decode_service_pb2,
    decode_service_pb2_grpc,
    kvstore_service_pb2,
    kvstore_service_pb2_grpc,
    prefill_service_pb2,
)
from pdserve.v1 import generation_service_pb2 as pb
from pdserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.cluster.registry import InstanceInfo, RegistryView
from services.common import faultpoints
from services.common.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    PdserveError,
    ResourceExhausted,
    Unavailable,
    abort_with,
    from_rpc_error,
)
from services.common.runtime import new_channel
from services.control.loop import ControlLoop
from services.gateway import assist
from services.gateway.admission import PrefillAdmission
from services.gateway.fwdqueue import ForwardingQueue
from services.gateway.policy import (
    Candidate,
    rank_decodes,
    rank_least_open_streams,
    same_weights,
    servable_prefills,
)
from services.gateway.scheduling import Policy
from services.gateway.validation import ValidRequest, validate
from services.model.info import ModelInfo
from services.model.tokenizer import Detokenizer, TextTokenizer
from services.observe.metrics import Labels, RequestMetrics
from services.observe.telemetry import (
    ATTR_CLIENT_REQUEST_ID,
    ATTR_COMPLETION_TOKENS,
    ATTR_PROMPT_TOKENS,
    ATTR_REQUEST_ID,
    ATTR_SCENARIO,
    tracer,
)

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
DECODE_RETRY_S = 0.05  # between rounds, only for decodes that predate wait_for_slot_ms
DECODE_WAIT_S = 1.0  # longest wait at one full decode before every decode is asked again
MISS_REFRESH_S = 1.0
TOKENIZE_INLINE_CHARS = 4096  # longer text prompts are tokenized on a thread
_FINISH_NAMES = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
                 common_pb2.FINISH_REASON_CANCELLED: "cancelled"}


@dataclass
class Progress:
    """What one request has done so far, for the final timings."""

    t0: float = field(default_factory=time.monotonic)
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    kv_transfer_ms: float = 0.0
    ttft_ms: float = 0.0
    token_times: list[float] = field(default_factory=list)
    kv: common_pb2.KvRef | None = None
    kv_consumed: bool = False
    kv_fetch_transport: str = ""  # what carried the decode's fetch (the push is in kv)
    kv_fetch_fallback: bool = False
    sse_prefill: str = ""  # the prefill whose open-stream count this request holds to the end
    refine_ratio: float = 0.0  # P/D-Device: rho asked for (assist.py); 0 = none
    group: str = ""  # the scenario group it was routed to (metrics)
    prompt_tokens: int = 0
    prefill_asked: bool = False  # a prefill may hold a reservation for it
    prefill_done: bool = False  # a first-token-only prefill ended: it staged no KV

    def stage(self) -> str:
        """Where the request is, for the deadline metric: ttft, handoff or decode."""
        if not self.token_times:
            return "ttft"
        return "decode" if self.kv_consumed else "handoff"

    def _kv_path(self) -> str:
        """"shm" when both hops took shm; "tcp>shm" (push>fetch) when they differ."""
        push = self.kv.transport if self.kv is not None else ""
        fetch = self.kv_fetch_transport
        return push if not fetch or fetch == push else f"{push}>{fetch}"

    def timings(self) -> common_pb2.Timings:
        gaps = [b - a for a, b in itertools.pairwise(self.token_times)]
        return common_pb2.Timings(
            queue_ms=self.queue_ms, prefill_ms=self.prefill_ms,
            kv_transfer_ms=self.kv_transfer_ms, ttft_ms=self.ttft_ms,
            mean_tpot_ms=1e3 * sum(gaps) / len(gaps) if gaps else 0.0,
            max_tpot_ms=1e3 * max(gaps) if gaps else 0.0,
            e2e_ms=1e3 * (time.monotonic() - self.t0),
            kv_transport=self._kv_path(),
            kv_fallback=(self.kv is not None and self.kv.fallback) or self.kv_fetch_fallback,
        )


class GenerationServicer(pb_grpc.GenerationServiceServicer):
    # The P/D ratio controller (docs/control-plane.md), when this gateway runs one: every finished
    # request adds to its per-group period stats.
    control: ControlLoop | None = None

    def __init__(self, info: ModelInfo, tokenizer: TextTokenizer, view: RegistryView,
                 group: str, default_max_tokens: int, policy: Policy = Policy.FORWARD,
                 queue: ForwardingQueue | None = None, max_queue_s: float = 60.0,
                 refuse_unknown_scenario: bool = False,
                 metrics: RequestMetrics | None = None) -> None:
        self.refuse_unknown_scenario = refuse_unknown_scenario
        self.instance_id = ""  # this gateway's registry id: the owner of its requests' KV
        self.metrics = metrics or RequestMetrics(Labels("gateway", group, "gateway"))
        self.info = info
        self.tok = tokenizer
        self.view = view
        self.default_group = group
        self.default_max_tokens = default_max_tokens
        self.open_streams: Counter[str] = Counter()
        self._rr = itertools.count()
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.admission = PrefillAdmission(policy, self._ranked, self.channel, self.open_streams,
                                          queue, max_queue_s)
        self.admission.metrics = self.metrics
        self.admission.refresh_view = self.view.refresh

    def channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = new_channel(address)
        return self._channels[address]

    async def close(self) -> None:
        await asyncio.gather(*self._background, return_exceptions=True)
        for ch in self._channels.values():
            await ch.close()

    async def _ranked(self, role: str, group: str) -> list[InstanceInfo]:
        found = self.view.instances(role=role, group=group)
        if not found:
            # The polled view may lag a just-registered instance; look once more before failing.
            await self.view.refresh()
            found = self.view.instances(role=role, group=group)
        if not found:
            raise Unavailable(f"no {role} instance is registered in scenario group {group!r}",
                              reason=f"NO_{role.upper()}", metadata={"group": group})
        if role == "prefill":
            found = [found[k] for k in servable_prefills(
                [i.model_fingerprint for i in found],
                (i.model_fingerprint for i in self.view.instances(role="decode", group=group)))]
        by_id = {i.instance_id: i for i in found}
        cands = [Candidate(i.instance_id, i.slots,
                           kv_fallback_rate=i.load.get("kv_fallback_rate", 0.0)) for i in found]
        rank = rank_decodes if role == "decode" else rank_least_open_streams
        return [by_id[c.instance_id] for c in rank(cands, self.open_streams, next(self._rr))]

    async def _group_for(self, scenario: str) -> str:
        """A request's scenario picks its group; an unknown one goes to the default group
        or is refused (``unknown_scenario``). Known = some instance serves it."""
        if not scenario or scenario == self.default_group:
            return self.default_group
        if not self.view.instances(group=scenario) and \
                time.monotonic() - self.view.refreshed_at > MISS_REFRESH_S:
            # At most once a second, so unknown scenarios cannot hammer Redis.
            await self.view.refresh()
        if self.view.instances(group=scenario):
            return scenario
        if self.refuse_unknown_scenario:
            raise InvalidArgument(f"unknown scenario {scenario!r}: no scenario group serves it",
                                  reason="UNKNOWN_SCENARIO", metadata={"scenario": scenario})
        return self.default_group

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        try:
            async with contextlib.aclosing(self.stream(request, context.time_remaining())) as it:
                async for msg in it:
                    yield msg
        except PdserveError as e:
            await abort_with(context, e)

    async def stream(
        self, request: pb.GenerateRequest, time_remaining: float | None
    ) -> AsyncGenerator[pb.GenerateResponse, None]:
        """One request's path, shared by gRPC ``Generate`` and the HTTP door (http.py).
        Raises ``PdserveError``; cancelling or closing it early (the client went away)
        cancels the downstream calls and releases the KV, as a gRPC cancel does."""
        # The internal id: unique, and the only key anything downstream uses (block tables,
        # KV handles, queue entries, spans). The client's request_id is a label only.
        rid = uuid.uuid4().hex
        progress = Progress()
        outcome = "abort"  # until it ends otherwise: the client went away
        with _tracer.start_as_current_span("gateway.generate") as span:
            span.set_attribute(ATTR_REQUEST_ID, rid)
            try:
                if len(request.prompt) > TOKENIZE_INLINE_CHARS:  # keep the event loop free
                    req = await asyncio.to_thread(validate, request, rid, self.info, self.tok,
                                                  self.default_max_tokens)
                else:
                    req = validate(request, rid, self.info, self.tok, self.default_max_tokens)
                if req.client_request_id:
                    span.set_attribute(ATTR_CLIENT_REQUEST_ID, req.client_request_id)
                progress.refine_ratio = assist.refine_ratio(request)  # P/D-Device
                req = assist.apply_budget(request, req)
                span.set_attribute(ATTR_PROMPT_TOKENS, len(req.prompt_ids))
                span.set_attribute(ATTR_SCENARIO, req.scenario or self.default_group)
                progress.prompt_tokens = len(req.prompt_ids)
                async for msg in self._generate(req, time_remaining, progress):
                    if msg.finish_reason:
                        outcome = _FINISH_NAMES.get(msg.finish_reason, "error")
                    yield msg
                span.set_attribute(ATTR_COMPLETION_TOKENS, len(progress.token_times))
            except PdserveError as e:
                e.metadata["internal_id"] = rid
                if request.request_id and e.reason != "BAD_REQUEST_ID":
                    e.metadata["request_id"] = request.request_id  # validated: bounded
                else:
                    e.metadata.setdefault("request_id", rid)
                span.record_exception(e)
                outcome = "error"
                if e.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    outcome = "deadline"
                    self.metrics.deadline(progress.group or self.default_group,
                                          progress.stage())
                raise
            finally:
                if progress.sse_prefill:
                    self.open_streams[progress.sse_prefill] -= 1
                if progress.kv is not None and not progress.kv_consumed:
                    self._release_later(progress.kv, rid, "request ended before decode fetched")
                elif progress.kv is None and progress.prefill_asked \
                        and not progress.prefill_done:
                    # A prefill may have staged KV whose KvRef never reached us (cancelled
                    # between reserve and kv_ready, or the prefill died): release by id.
                    self._release_request(rid, progress.group or self.default_group)
                self._observe(progress, outcome)

    def _observe(self, p: Progress, outcome: str) -> None:
        group = p.group or self.default_group
        self.metrics.finished(
            group, outcome, ttft_s=p.ttft_ms / 1e3 if p.token_times else None,
            token_times=p.token_times, e2e_s=time.monotonic() - p.t0,
            prompt_tokens=p.prompt_tokens, queue_s=p.queue_ms / 1e3 if p.queue_ms else None)
        if p.kv is not None and p.kv_consumed:
            self.metrics.kv(group, p.kv_transfer_ms / 1e3, p.kv.transport, p.kv_fetch_transport,
                            p.kv.nbytes, p.kv.fallback or p.kv_fetch_fallback)
        if self.control is not None and outcome != "cancelled" and outcome != "abort":
            # Decode steps only: the first gap is the handoff (and any wait for a slot).
            gaps = [b - a for a, b in itertools.pairwise(p.token_times[1:])]
            self.control.window.record(
                group, outcome in ("stop", "length"), 1e3 * (time.monotonic() - p.t0),
                p.ttft_ms, p.prompt_tokens, len(p.token_times), p.prefill_ms,
                p.kv_transfer_ms, 1e3 * sum(gaps) / len(gaps) if gaps else 0.0)

    def _release_later(self, kv: common_pb2.KvRef, rid: str, reason: str) -> None:
        stub = kvstore_service_pb2_grpc.KvStoreServiceStub(self.channel(kv.control_address))

        async def release() -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.ReleaseKv(kvstore_service_pb2.ReleaseKvRequest(
                    handle=kv.handle, request_id=rid, reason=reason), timeout=5)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _release_request(self, rid: str, group: str) -> None:
        """Release whatever the group's kvstores hold for internal id ``rid`` (the
        prefill picks one of the group's, or any when the group has none)."""
        stores = self.view.instances(role="kvstore")
        for inst in [s for s in stores if s.group == group] or stores:
            self._release_later(common_pb2.KvRef(control_address=inst.address), rid,
                                "request ended before its KvRef reached the gateway")

    async def _generate(
        self, req: ValidRequest, remaining: float | None, p: Progress
    ) -> AsyncIterator[pb.GenerateResponse]:
        group = p.group = await self._group_for(req.scenario)
        deadline = time.monotonic() + remaining if remaining is not None else None
        ttft_deadline = p.t0 + req.ttft_deadline_ms / 1e3 if req.ttft_deadline_ms else None
        if deadline is not None and (ttft_deadline is None or deadline < ttft_deadline):
            ttft_deadline = deadline
        sampling = common_pb2.SamplingParams(temperature=req.temperature, top_p=req.top_p)
        if req.seed is not None:
            sampling.seed = req.seed
        detok = Detokenizer(self.tok, req.stop)

        try:
            async with asyncio.timeout_at(_loop_time(ttft_deadline)):
                first, call, instance_id = await self._prefill(req, group, sampling,
                                                               ttft_deadline, p)
        except TimeoutError:
            raise DeadlineExceeded("no first token within the TTFT deadline") from None
        try:
            p.ttft_ms = (time.monotonic() - p.t0) * 1e3
            p.token_times.append(time.monotonic())
            text = detok.add([first])
            yield pb.GenerateResponse(token_ids=[first], text=text,
                                      request_id=req.client_request_id or req.request_id,
                                      prompt_tokens=len(req.prompt_ids))
            # The TTFT SLO is met from here on; the handoff is bounded by the call's deadline.
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    refined = await assist.read_refined(call, instance_id) \
                        if p.refine_ratio else None
                if refined is not None:  # P/D-Device: P' just after the first token
                    yield refined
                async with asyncio.timeout_at(_loop_time(deadline)):
                    await faultpoints.pause("gateway.before_kv_read")
                    kv_ready = await self._await_kv(call, instance_id, p,
                                                    required=not preq_first_only(req))
            except TimeoutError:
                raise DeadlineExceeded("the deadline passed during the KV handoff") from None
        finally:
            call.cancel()
            if self.admission.policy.lifetime_streams:
                p.sse_prefill = instance_id  # released when the whole stream ends
            else:
                self.open_streams[instance_id] -= 1
        p.kv_transfer_ms = kv_ready

        finish = common_pb2.FINISH_REASON_LENGTH
        tail_ids: list[int] = []
        tail_text = ""
        if detok.stopped or first in self.info.eos_token_ids:
            finish = common_pb2.FINISH_REASON_STOP
        elif req.max_tokens > 1:
            try:
                async with asyncio.timeout_at(_loop_time(deadline)):
                    async for ids, text, reason, last in self._decode(req, group, sampling,
                                                                      first, detok, p):
                        p.token_times.extend([time.monotonic()] * len(ids))
                        if last:  # the decode's last batch goes out with the final message
                            tail_ids, tail_text = ids, text
                        elif ids or text:
                            yield pb.GenerateResponse(token_ids=ids, text=text)
                        finish = reason
            except TimeoutError:
                raise DeadlineExceeded("the request's deadline passed while decoding") from None
        # The last tokens, finish reason and timings in one message (one message fewer per
        # request than sending the tokens and then the end apart).
        yield pb.GenerateResponse(token_ids=tail_ids, text=tail_text + detok.flush(),
                                  finish_reason=finish, timings=p.timings(),
                                  request_id=req.client_request_id or req.request_id,
                                  prompt_tokens=len(req.prompt_ids))

    async def _prefill(self, req: ValidRequest, group: str, sampling: common_pb2.SamplingParams,
                       ttft_deadline: float | None, p: Progress,
                       ) -> tuple[int, grpc.aio.UnaryStreamCall, str]:
        """Get the request into a prefill (``admission``); return the first token and the
        still-open call (the caller reads kv_ready from it, then closes it)."""
        preq = prefill_service_pb2.PrefillRequest(
            request_id=req.request_id, prompt_token_ids=req.prompt_ids, sampling=sampling,
            scenario=group,
            ttft_deadline_unix_ms=int((time.time() + ttft_deadline - time.monotonic()) * 1e3)
            if ttft_deadline is not None else 0, refine_ratio=p.refine_ratio,
            client_request_id=req.client_request_id, gateway_id=self.instance_id,
            first_token_only=preq_first_only(req))

        def on_accepted() -> None:
            p.queue_ms = (time.monotonic() - p.t0) * 1e3

        p.prefill_asked = True
        got = await self.admission.admit(preq, group, on_accepted)
        p.prefill_ms = got.prefill_ms
        return got.first_token, got.call, got.instance_id

    @staticmethod
    async def _await_kv(call: grpc.aio.UnaryStreamCall, instance_id: str, p: Progress,
                        required: bool = True) -> float:
        """Read the prefill's stream to its end; the KV stage time. ``required=False``: a
        first-token-only request, whose prefill stages no KV (0.0 then)."""
        stage_ms: float | None = None
        try:
            # Read to the end of the stream: the prefill counts the KV as handed off only
            # once its last message went out; cancelling earlier would make it release.
            async for ev in call:
                if ev.WhichOneof("event") == "kv_ready":
                    p.kv = ev.kv_ready.kv
                    stage_ms = float(ev.kv_ready.kv_stage_ms)
            if stage_ms is None:
                if not required:
                    p.prefill_done = True
                    return 0.0
                raise Unavailable("prefill ended without handing off the KV",
                                  reason="KV_HANDOFF_MISSING")
            return stage_ms
        except grpc.aio.AioRpcError as e:
            raise from_rpc_error(e, f"prefill {instance_id} KV handoff") from e

    async def _decode(
        self, req: ValidRequest, group: str, sampling: common_pb2.SamplingParams, first: int,
        detok: Detokenizer, p: Progress,
    ) -> AsyncIterator[tuple[list[int], str, common_pb2.FinishReason, bool]]:
        """Token batches with their finish reason, and whether the batch is the last."""
        assert p.kv is not None
        dreq = decode_service_pb2.DecodeRequest(
            request_id=req.request_id, kv=p.kv, first_token_id=first, sampling=sampling,
            max_new_tokens=req.max_tokens - 1, client_request_id=req.client_request_id)
        give_up = time.monotonic() + self.admission.max_queue_s
        await faultpoints.pause("gateway.before_decode")
        while True:
            # Round 1 asks every decode, refused at once when full. Round 2, when all were
            # full, waits at the best-ranked one, which hands the request the next slot it
            # frees (no polling); after DECODE_WAIT_S every decode is asked again.
            for wait_s in (0.0, min(DECODE_WAIT_S, give_up - time.monotonic())):
                if wait_s < 0:
                    break
                dreq.wait_for_slot_ms = int(wait_s * 1e3)
                t_round = time.monotonic()
                async for out in self._decode_round(dreq, group, detok, p,
                                                    first_only=wait_s > 0):
                    if out is None:  # a decode took it and finished
                        return
                    yield out
            # Every decode is full: the KV waits in the kvstore (under its lease), within
            # the request's deadline (P/D-Serve: prefill holds finished KV while it waits
            # for an idle decoding instance).
            if time.monotonic() > give_up:
                raise ResourceExhausted(f"no decode slot in group {group!r} freed in time",
                                        reason="DECODE_SLOTS_FULL")
            if time.monotonic() - t_round < wait_s / 2:  # it did not wait: an older decode
                await asyncio.sleep(DECODE_RETRY_S)

    async def _decode_round(
        self, dreq: decode_service_pb2.DecodeRequest, group: str, detok: Detokenizer,
        p: Progress, first_only: bool = False,
    ) -> AsyncIterator[tuple[list[int], str, common_pb2.FinishReason, bool] | None]:
        """Try each decode once (only the best-ranked with ``first_only``). Yields token
        batches, then None once served; ends without None when every one was full."""
        last_error: PdserveError | None = None
        ranked = self._same_model(await self._ranked("decode", group), dreq.kv, group)
        for inst in ranked[:1] if first_only else ranked:
            stub = decode_service_pb2_grpc.DecodeServiceStub(self.channel(inst.address))
            call = stub.Decode(dreq)
            self.open_streams[inst.instance_id] += 1
            started = False
            try:
                async for msg in call:
                    if not started:
                        started = p.kv_consumed = True
                        p.kv_transfer_ms += msg.kv_fetch_ms
                        p.kv_fetch_transport = msg.kv_transport
                        p.kv_fetch_fallback = msg.kv_fallback
                    text = detok.add(msg.token_ids)
                    if detok.stopped:
                        yield list(msg.token_ids), text, common_pb2.FINISH_REASON_STOP, True
                        yield None
                        return
                    yield (list(msg.token_ids), text,
                           msg.finish_reason or common_pb2.FINISH_REASON_LENGTH,
                           bool(msg.finish_reason))
                yield None
                return
            except grpc.aio.AioRpcError as e:
                err = from_rpc_error(e, f"decode {inst.instance_id}")
                # KV_MODEL_MISMATCH is refused before the fetch (the KV stays staged): a
                # decode whose registry record lagged its weights; the next one may serve.
                retryable = e.code() in (grpc.StatusCode.UNAVAILABLE,
                                         grpc.StatusCode.RESOURCE_EXHAUSTED) \
                    or err.reason == "KV_MODEL_MISMATCH"
                if started or not retryable or err.reason == "KV_FETCH_FAILED":
                    raise err from e
                last_error = err
            finally:
                call.cancel()
                self.open_streams[inst.instance_id] -= 1
        if last_error is None or last_error.reason != "DECODE_SLOTS_FULL":
            raise last_error or Unavailable(f"no decode in group {group!r} took the request")

    @staticmethod
    def _same_model(ranked: list[InstanceInfo], kv: common_pb2.KvRef,
                    group: str) -> list[InstanceInfo]:
        """Only decodes that serve the model which produced the KV: during a rolling
        upgrade to new weights a group holds both, and a decode of the other model would
        refuse the KV (KV_MODEL_MISMATCH) and fail a request another decode can serve."""
        fp = kv.model_fingerprint
        same = [i for i in ranked if same_weights(i.model_fingerprint, fp)]
        if not same:
            raise FailedPrecondition(
                f"no decode in group {group!r} serves the model that prefilled this request "
                f"({fp[:12]}); its {len(ranked)} decode(s) serve other weights",
                reason="KV_MODEL_MISMATCH", metadata={"group": group})
        return same


def preq_first_only(req: ValidRequest) -> bool:
    """No decode follows the first token: the prefill need not stage any KV. (A first
    token that is EOS or hits a stop string is known only after the prefill.)"""
    return req.max_tokens == 1


def _loop_time(deadline: float | None) -> float | None:
    """monotonic() deadline -> event-loop time (both are CLOCK_MONOTONIC on Linux)."""
    if deadline is None:
        return None
    loop = asyncio.get_running_loop()
    return loop.time() + (deadline - time.monotonic())
