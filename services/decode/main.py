"""decode: continues requests from their transferred KV.

Lifecycle of the process: load the model and warm it up, bind gRPC, register in
Redis as role "decode" with ``slots``, then serve until SIGTERM.

Lifecycle of a request (``Decode``, server-streaming):
  1. Take a slot (RESOURCE_EXHAUSTED when all are busy: the gateway picks another).
  2. Fetch the KV from the kvstore's data channel (single consumer: the kvstore
     frees it once sent), verify header, model fingerprint and checksum, and view
     it as a transformers DynamicCache without copying.
  3. Step from the first token until EOS, a stop token or max_new_tokens, one
     message per token. Model calls from all requests share one thread, so
     concurrent requests interleave step by step.
  Cancellation (the gateway's call ends) stops at the next step and frees the cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING

import grpc

from pdserve.v1 import common_pb2
from pdserve.v1 import decode_service_pb2 as pb
from pdserve.v1 import decode_service_pb2_grpc as pb_grpc
from services.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    PdserveError,
    ResourceExhausted,
    abort_with,
)
from services.common.kvlayout import KvFormatError
from services.common.runtime import ServiceRuntime, run_main
from services.common.telemetry import (
    ATTR_COMPLETION_TOKENS,
    ATTR_KV_BYTES,
    ATTR_REQUEST_ID,
    tracer,
)
from services.common.transport import pull_kv, transfer_load
from services.common.workers import WorkerConfig, worker_info
from services.decode.steploop import DecodeSequence, StepLoop

if TYPE_CHECKING:
    from services.engine.runner import ModelRunner

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["DecodeService"].full_name


class DecodeServicer(pb_grpc.DecodeServiceServicer):
    def __init__(self, cfg: WorkerConfig, runtime: ServiceRuntime, runner: ModelRunner,
                 steps: StepLoop) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.runner = runner
        self.steps = steps
        self.active: dict[str, int] = {}  # request_id -> KV bytes held
        self.stats = pb.GetDecodeStatsResponse(instance_id=runtime.instance_id, slots=cfg.slots)

    async def _fetch(self, request: pb.DecodeRequest):  # type: ignore[no-untyped-def]
        kv, rid = request.kv, request.request_id
        if kv.model_fingerprint and kv.model_fingerprint != self.runner.fingerprint:
            raise FailedPrecondition(
                f"KV comes from model {kv.model_fingerprint[:12]}, this decode serves "
                f"{self.runner.fingerprint[:12]}", reason="KV_MODEL_MISMATCH",
                metadata={"request_id": rid})
        with _tracer.start_as_current_span("kv.fetch") as span:
            span.set_attribute(ATTR_REQUEST_ID, rid)
            span.set_attribute(ATTR_KV_BYTES, int(kv.nbytes))
            buf, xfer = await pull_kv(self.cfg, kv, rid)
        try:
            meta, cache = await self.steps.run(self.runner.restore, buf,
                                               request.max_new_tokens)
        except KvFormatError as e:
            reason = "KV_MODEL_MISMATCH" if "model" in str(e) else "KV_CORRUPT"
            cls = FailedPrecondition if reason == "KV_MODEL_MISMATCH" else Aborted
            raise cls(str(e), reason=reason, metadata={"request_id": rid}) from e
        return meta, cache, len(buf), xfer

    async def Decode(
        self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DecodeResponse]:
        from services.engine.sampling import Sampling

        rid = request.request_id
        if not rid or not request.kv.handle:
            await abort_with(context, InvalidArgument("request_id and kv.handle are required"))
        if len(self.active) >= self.cfg.slots:
            await abort_with(context, ResourceExhausted(
                f"all {self.cfg.slots} decode slots are busy", reason="DECODE_SLOTS_FULL",
                metadata={"request_id": rid}))
        self.active[rid] = 0
        try:
            t0 = time.monotonic()
            meta, cache, nbytes, xfer = await self._fetch(request)
            self.active[rid] = nbytes
            fetch_ms = (time.monotonic() - t0) * 1e3
            if meta.num_tokens + request.max_new_tokens > self.runner.info.max_context:
                raise InvalidArgument("prompt plus max_new_tokens exceeds the model context")
            sp = request.sampling
            params = Sampling(sp.temperature, sp.top_p or 1.0,
                              sp.seed if sp.HasField("seed") else None)
            stops = frozenset(request.stop_token_ids) or frozenset(self.runner.info.eos_token_ids)
            if request.first_token_id in stops or request.max_new_tokens == 0:
                reason = (common_pb2.FINISH_REASON_STOP if request.first_token_id in stops
                          else common_pb2.FINISH_REASON_LENGTH)
                yield pb.DecodeResponse(finish_reason=reason, kv_fetch_ms=fetch_ms,
                                        kv_transport=xfer.transport, kv_fallback=xfer.fallback)
                self.stats.completed_total += 1
                return
            seq = DecodeSequence(rid, cache, request.first_token_id, params, request.max_new_tokens,
                           stops, asyncio.get_running_loop())
            del cache
            with _tracer.start_as_current_span("decode.loop") as span:
                span.set_attribute(ATTR_REQUEST_ID, rid)
                self.steps.submit(seq)
                try:
                    done, first_msg = False, True
                    while not done:
                        ids: list[int] = []
                        item = await seq.queue.get()
                        while True:  # coalesce tokens that are already waiting
                            if isinstance(item, BaseException):
                                raise Aborted(f"decode step failed: {item}",
                                              reason="DECODE_STEP_FAILED") from item
                            ids.append(item[0])
                            done = item[1]
                            if done or seq.queue.empty():
                                break
                            item = seq.queue.get_nowait()
                        finish = common_pb2.FINISH_REASON_UNSPECIFIED
                        if done:
                            finish = (common_pb2.FINISH_REASON_STOP if ids[-1] in stops
                                      else common_pb2.FINISH_REASON_LENGTH)
                        yield pb.DecodeResponse(token_ids=ids, finish_reason=finish,
                                                kv_fetch_ms=fetch_ms if first_msg else 0.0,
                                                kv_transport=xfer.transport if first_msg else "",
                                                kv_fallback=xfer.fallback and first_msg)
                        first_msg = False
                finally:
                    self.steps.cancel(seq)
                span.set_attribute(ATTR_COMPLETION_TOKENS, seq.produced)
            self.stats.completed_total += 1
        except asyncio.CancelledError:
            self.stats.cancelled_total += 1
            raise
        except PdserveError as e:
            self.stats.failed_total += 1
            await abort_with(context, e)
        finally:
            self.active.pop(rid, None)

    async def GetDecodeStats(
        self, request: pb.GetDecodeStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDecodeStatsResponse:
        out = pb.GetDecodeStatsResponse()
        out.CopyFrom(self.stats)
        out.active = len(self.active)
        out.kv_bytes_held = sum(self.active.values())
        out.steps_total = self.steps.steps_total
        out.step_seconds_total = self.steps.step_seconds_total
        return out

    def load(self) -> dict[str, float]:
        return {"active": float(len(self.active)), "slots": float(self.cfg.slots),
                "kv_bytes_held": float(sum(self.active.values())), **transfer_load()}


async def start(cfg: WorkerConfig) -> tuple[ServiceRuntime, DecodeServicer]:
    from services.engine.factory import load_runner

    runtime = ServiceRuntime(cfg, "decode", [SERVICE])
    steps = StepLoop()
    # Load on the step thread: the event loop keeps serving health and heartbeats.
    runner = await steps.run(load_runner, cfg.model, cfg.cache_dir, cfg.torch_threads)
    await steps.run(runner.warmup)
    steps.runner = runner
    servicer = DecodeServicer(cfg, runtime, runner, steps)
    await runtime.start(lambda s: pb_grpc.add_DecodeServiceServicer_to_server(servicer, s))
    await runtime.serving(worker_info(runtime, cfg, runner.fingerprint), servicer.load)
    return runtime, servicer


async def stop(runtime: ServiceRuntime, servicer: DecodeServicer) -> None:
    async def cleanup() -> None:
        servicer.steps.stop()

    await runtime.stop(cleanup)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(WorkerConfig, "decode", start, stop, argv)
