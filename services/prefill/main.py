"""prefill: runs prompts and hands their KV off.

Lifecycle of the process: load the model and warm it up, bind gRPC, register in
Redis as role "prefill" with ``slots`` (b_p), then serve until SIGTERM.

Lifecycle of a request (``Prefill``, server-streaming):
  1. Admission: take one of ``slots``. When all are busy, ADMISSION_MODE_QUEUE
     waits in a local FIFO; ADMISSION_MODE_REJECT_IF_BUSY answers ``rejected`` at
     once (the gateway forwards elsewhere). A request already past its TTFT
     deadline ends with DEADLINE_EXCEEDED (early intervention, before compute).
  2. ``accepted`` -> forward pass -> ``first_token``. The deadline is checked
     again after compute. The forward reuses the KV of the longest cached prompt
     prefix (chained 64-token block hashes, LRU under ``prefix_cache_mb``) and
     computes only the rest; the KV handed to decode is still whole. Prompts of
     different requests are not batched into one forward: on 2 CPU cores that
     measured no faster than running them one after another (docs/engine.md).
  3. KV handoff: pack one contiguous buffer, reserve it at a kvstore, push it on
     the data channel, then ``kv_ready`` with the KvRef. The slot is held until here.
     With ``kv_layer_overlap`` (tcp only) each layer is packed and sent as soon as the
     forward has computed it, and only the header is left after compute.
  Cancellation or failure at any step releases the reservation at the kvstore.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import grpc

from pdserve.v1 import common_pb2, kvstore_service_pb2, kvstore_service_pb2_grpc
from pdserve.v1 import prefill_service_pb2 as pb
from pdserve.v1 import prefill_service_pb2_grpc as pb_grpc
from services.common.config import ConfigError
from services.common.errors import (
    DeadlineExceeded,
    InvalidArgument,
    PdserveError,
    Unavailable,
    abort_with,
    error_info,
    from_rpc_error,
)
from services.common.keys import slotfree_channel
from services.common.registry import RegistryView
from services.common.runtime import (
    ServiceRuntime,
    host_id,
    new_channel,
    run_main,
)
from services.common.telemetry import (
    ATTR_KV_BYTES,
    ATTR_PROMPT_TOKENS,
    ATTR_REQUEST_ID,
    tracer,
)
from services.engine.worker import ModelThread, WorkerConfig, now_ms, worker_info
from services.kv import push_kv, transfer_load
from services.kv.layers import LayerPush
from services.prefill.estimator import PrefillEstimator, reservation_lease_ms

if TYPE_CHECKING:
    from services.engine.kv import LayerPacker
    from services.engine.runner import ModelRunner
    from services.engine.sampling import Sampling

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
ATTR_KV_LAYERED = "pdserve.kv.layered"
SERVICE = pb.DESCRIPTOR.services_by_name["PrefillService"].full_name


@dataclass(frozen=True)
class PrefillConfig(WorkerConfig):
    """A prefill worker: a model worker plus its prefix KV cache."""

    prefix_cache_mb: int = 256  # LRU cap of the prefix KV cache; 0 turns it off
    prefix_block_tokens: int = 64  # tokens per cached block (chained hashes)
    # Lease on the staged KV for the handoff after the compute; the reservation adds the
    # expected compute (reservation_lease_ms).
    kv_lease_s: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_lease_s <= 0:
            raise ConfigError(f"need kv_lease_s > 0, got {self.kv_lease_s}")
        if self.prefix_cache_mb < 0 or self.prefix_block_tokens <= 0:
            raise ConfigError(f"need prefix_cache_mb >= 0 and prefix_block_tokens > 0, got "
                              f"{self.prefix_cache_mb}, {self.prefix_block_tokens}")

    @staticmethod
    def of(cfg: WorkerConfig) -> PrefillConfig:
        """A plain worker config as a prefill config (prefix settings at their defaults)."""
        if isinstance(cfg, PrefillConfig):
            return cfg
        return PrefillConfig(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})


@dataclass
class _Layered:
    """A per-layer push in flight and the buffer its layers are packed into."""

    push: LayerPush
    packer: LayerPacker

    def on_layer(self, i: int, cache: object) -> None:  # on the model thread
        self.packer(i, cache)  # type: ignore[arg-type]
        self.push.layer_done(i)


class PrefillServicer(pb_grpc.PrefillServiceServicer):
    def __init__(self, cfg: WorkerConfig, runtime: ServiceRuntime, runner: ModelRunner,
                 thread: ModelThread) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.runner = runner
        self.thread = thread
        self.slots = asyncio.Semaphore(cfg.slots)
        self.busy = 0
        self.queued = 0
        self.draining = False
        self.stats = pb.GetPrefillStatsResponse(instance_id=runtime.instance_id, slots=cfg.slots)
        self.estimator = PrefillEstimator()
        self.view: RegistryView | None = None
        self._channels: dict[str, kvstore_service_pb2_grpc.KvStoreServiceStub] = {}
        self._background: set[asyncio.Task[None]] = set()

    def _kvstore(self) -> tuple[str, kvstore_service_pb2_grpc.KvStoreServiceStub]:
        stores = self.view.instances(role="kvstore") if self.view else []
        same = [s for s in stores if s.group == self.cfg.group] or stores
        if not same:
            raise Unavailable("no kvstore instance is registered; start one "
                              "(pdserve serve kvstore)", reason="NO_KVSTORE")
        best = min(same, key=lambda s: (s.load.get("bytes_held", 0.0), s.instance_id))
        if best.address not in self._channels:
            self._channels[best.address] = kvstore_service_pb2_grpc.KvStoreServiceStub(
                new_channel(best.address))
        return best.address, self._channels[best.address]

    def _check(self, request: pb.PrefillRequest) -> None:
        if not request.request_id:
            raise InvalidArgument("request_id is required")
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
    ) -> AsyncIterator[pb.PrefillResponse]:
        from services.engine.refine import probe_for, refined_prompt
        from services.engine.sampling import Sampling
        from services.kv.layout import kv_nbytes

        rid = request.request_id
        self._deadline_passed(request, "before")
        self._deadline_unreachable(request)
        # Reserve the KV buffer before computing (P/D-Serve reserves for every admitted
        # prompt): a full kvstore becomes a rejection the gateway can forward around.
        info = self.runner.info
        nbytes = kv_nbytes(info.num_layers, info.num_kv_heads, info.head_dim,
                           len(request.prompt_token_ids), info.kv_dtype)
        address, kvstore = self._kvstore()
        try:
            lease_ms = reservation_lease_ms(self.cfg.kv_lease_s, self.estimator,
                                            len(request.prompt_token_ids))
            res = await kvstore.ReserveKv(kvstore_service_pb2.ReserveKvRequest(
                request_id=rid, nbytes=nbytes, lease_ms=lease_ms), timeout=10)
        except grpc.aio.AioRpcError as e:
            err = from_rpc_error(e, "reserving KV at the kvstore", request_id=rid)
            if err.reason == "KV_CAPACITY" and \
                    request.admission_mode == pb.ADMISSION_MODE_REJECT_IF_BUSY:
                self.stats.rejected_total += 1
                yield pb.PrefillResponse(rejected=pb.PrefillRejected(
                    reason=pb.REJECT_REASON_KV_CAPACITY, message=err.message))
                return
            if error_info(e) is None:  # no answer from the kvstore itself: say which hop broke
                err = Unavailable(f"the kvstore at {address} is unreachable: {e.details()}",
                                  reason="KVSTORE_UNAVAILABLE",
                                  metadata={"request_id": rid, "kvstore": address})
            raise err from e
        handle = res.handle
        layered: _Layered | None = None
        try:
            self.stats.accepted_total += 1
            yield pb.PrefillResponse(accepted=pb.PrefillAccepted(
                instance_id=self.runtime.instance_id, queue_ms=queue_ms))
            sp = request.sampling
            params = Sampling(sp.temperature, sp.top_p or 1.0,
                              sp.seed if sp.HasField("seed") else None)
            with _tracer.start_as_current_span("prefill.compute") as span:
                span.set_attribute(ATTR_REQUEST_ID, rid)
                span.set_attribute(ATTR_PROMPT_TOKENS, len(request.prompt_token_ids))
                t0 = time.monotonic()
                probe = probe_for(self.runner, request.refine_ratio)  # P/D-Device
                hook: tuple[object, ...] = ()
                if probe is None:
                    layered = await self._layered_push(res, rid, len(request.prompt_token_ids))
                    hook = (layered.on_layer,) if layered is not None else ()
                first, cache = await self.thread.run(
                    probe.wrap(self._compute) if probe else self._compute,
                    list(request.prompt_token_ids), params, probe is None, *hook)
                prefill_ms = (time.monotonic() - t0) * 1e3
            self.estimator.observe(len(request.prompt_token_ids), prefill_ms)
            self._deadline_passed(request, "after")
            t_first = time.monotonic()
            yield pb.PrefillResponse(first_token=pb.FirstToken(token_id=first,
                                                               prefill_ms=prefill_ms))
            if request.refine_ratio > 0:  # P/D-Device: P' right after the first token
                kept, method, refine_ms = await self.thread.run(
                    refined_prompt, probe, cache, list(request.prompt_token_ids),
                    request.refine_ratio)
                yield pb.PrefillResponse(refined=pb.RefinedPrompt(
                    token_ids=kept, method=method, refine_ms=refine_ms))
            if layered is None:
                meta, buf = await self.thread.run(self.runner.pack, cache, self.cfg.kv_checksum)
            del cache
            with _tracer.start_as_current_span("kv.push") as span:
                span.set_attribute(ATTR_REQUEST_ID, rid)
                span.set_attribute(ATTR_KV_LAYERED, layered is not None)
                if layered is not None:  # the layers went during compute; the header now
                    xfer = await layered.push.finish(layered.packer.header,
                                                     context.time_remaining())
                    meta, buf = layered.packer.meta, layered.packer.buf
                else:
                    xfer = await push_kv(self.cfg, res, rid, buf, meta.num_tokens,
                                         context.time_remaining())
                span.set_attribute(ATTR_KV_BYTES, int(buf.nbytes))
            kv = common_pb2.KvRef(
                handle=handle, control_address=address, data_address=res.data_address,
                transport=xfer.transport, nbytes=buf.nbytes, num_tokens=meta.num_tokens,
                model_fingerprint=self.runner.fingerprint, endpoints=res.endpoints,
                fallback=xfer.fallback)
            stage_ms = (time.monotonic() - t_first) * 1e3
            handed_off = False
            try:
                yield pb.PrefillResponse(kv_ready=pb.KvReady(kv=kv, kv_stage_ms=stage_ms))
                handed_off = True
            finally:
                if not handed_off:
                    await self._release(kvstore, handle, rid, "cancelled before handoff")
        except BaseException:
            if layered is not None:
                layered.push.abort()
            await self._release(kvstore, handle, rid, "prefill failed or was cancelled")
            raise

    async def _layered_push(self, res: kvstore_service_pb2.ReserveKvResponse, rid: str,
                            n: int) -> _Layered | None:
        """Per-layer transfer (``kv_layer_overlap``): layer i is sent while layer i+1
        computes. None when it is off, the runner cannot hook its layers (the mock), or
        the push does not go over tcp: then the KV is packed and pushed after compute."""
        make = getattr(self.runner, "layer_packer", None)
        if not self.cfg.kv_layer_overlap or make is None:
            return None
        packer = make(n)
        push = await LayerPush.open(self.cfg, res, rid, packer.buf, packer.meta.num_layers,
                                    self.cfg.kv_checksum, host_id())
        return _Layered(push, packer) if push is not None else None

    def _compute(self, ids: list[int], params: Sampling,  # type: ignore[no-untyped-def]
                 reuse_prefix: bool = True, on_layer=None):
        # A probed prefill must see the whole prompt's forward: no prefix reuse then.
        out = (self.runner.prefill(ids, params, reuse_prefix, on_layer) if on_layer
               else self.runner.prefill(ids, params, reuse_prefix))
        if self.cfg.emulate_prefill_ms_per_token > 0:
            time.sleep(len(ids) * self.cfg.emulate_prefill_ms_per_token / 1000.0)
        return out

    def _announce_free_slot(self) -> None:
        """Wake gateways whose requests wait in this group's forwarding queue (a hint)."""
        async def publish() -> None:
            with contextlib.suppress(Exception):
                await self.runtime.redis.publish(slotfree_channel(self.cfg.group),
                                                 self.runtime.instance_id)

        task = asyncio.get_running_loop().create_task(publish())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _release(stub: kvstore_service_pb2_grpc.KvStoreServiceStub, handle: str,
                       rid: str, reason: str) -> None:
        # Shielded: this runs while the call is being cancelled.
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await asyncio.shield(stub.ReleaseKv(kvstore_service_pb2.ReleaseKvRequest(
                handle=handle, request_id=rid, reason=reason), timeout=5))

    async def GetPrefillStats(
        self, request: pb.GetPrefillStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetPrefillStatsResponse:
        out = pb.GetPrefillStatsResponse()
        out.CopyFrom(self.stats)
        out.busy_slots = self.busy
        out.queued = self.queued
        return out

    def load(self) -> dict[str, float]:
        prefix = getattr(self.runner, "prefix", None)  # hits, misses, saved tokens, bytes
        return {"busy": float(self.busy), "queued": float(self.queued),
                "slots": float(self.cfg.slots), **transfer_load(),
                **(prefix.metrics() if prefix is not None else {})}


async def start(cfg: WorkerConfig) -> tuple[ServiceRuntime, PrefillServicer]:
    from services.engine.factory import load_runner

    cfg = PrefillConfig.of(cfg)
    runtime = ServiceRuntime(cfg, "prefill", [SERVICE])
    thread = ModelThread("prefill-model")
    # Load on the model thread: the event loop keeps serving health and heartbeats.
    runner = await thread.run(load_runner, cfg.model, cfg.cache_dir, cfg.torch_threads)
    await thread.run(runner.warmup)
    if cfg.prefix_cache_mb > 0 and hasattr(runner, "attach_prefix_cache"):
        runner.attach_prefix_cache(cfg.prefix_cache_mb << 20, cfg.prefix_block_tokens)
    servicer = PrefillServicer(cfg, runtime, runner, thread)
    await runtime.start(lambda s: pb_grpc.add_PrefillServiceServicer_to_server(servicer, s))
    servicer.view = RegistryView(runtime.redis)
    await servicer.view.start()
    await runtime.serving(worker_info(runtime, cfg, runner.fingerprint), servicer.load)
    return runtime, servicer


async def stop(runtime: ServiceRuntime, servicer: PrefillServicer) -> None:
    servicer.draining = True

    async def cleanup() -> None:
        if servicer.view is not None:
            await servicer.view.close()
        servicer.thread.shutdown()

    await runtime.stop(cleanup)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(PrefillConfig, "prefill", start, stop, argv)
