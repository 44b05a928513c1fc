"""decode: continues requests from their transferred KV.

Lifecycle of the process: load the model and warm it up, bind gRPC, register in
Redis as role "decode" with ``slots``, then serve until SIGTERM.

Lifecycle of a request (``Decode``, server-streaming):
  1. Take a slot and reserve the request's blocks in the paged KV pool (prompt +
     max_new_tokens) BEFORE the transfer starts. When either is full: RESOURCE_EXHAUSTED
     at once (the gateway tries another decode), or, if the request says
     ``wait_for_slot_ms``, wait that long in a FIFO for a slot (``slots.py``): the
     request that frees one hands it over as it ends.
  2. Check that the KvRef names a kvstore registered in this decode's group (a forged
     KvRef never makes it dial an address of the caller's choice), then fetch the KV
     from the kvstore's data channel (single consumer), verify header,
     model fingerprint and checksum, and scatter it into the reserved blocks
     (RecvScatter) on the step thread; then release the fetch (over shm the kvstore
     reuses its pages only after that, and never if the request was cancelled).
  3. Join the continuous batch at the next step (one forward for all active
     requests) and stream tokens until EOS, a stop token or max_new_tokens.
  Cancellation (the gateway's call ends) or any failure leaves the batch before its
  next step and returns the blocks to the pool.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import grpc

from pdserve.v1 import common_pb2
from pdserve.v1 import decode_service_pb2 as pb
from pdserve.v1 import decode_service_pb2_grpc as pb_grpc
from services.cluster.registry import InstanceInfo, RegistryView
from services.common import faultpoints
from services.common.config import ConfigError
from services.common.errors import (
    Aborted,
    FailedPrecondition,
    InvalidArgument,
    PdserveError,
    ResourceExhausted,
    abort_with,
)
from services.common.runtime import ServiceRuntime, host_id, run_main
from services.decode.slots import SlotWaiters
from services.decode.steploop import DecodeSequence, StepLoop
from services.engine.paged import PoolExhausted
from services.engine.worker import WorkerConfig, worker_info
from services.kv import fetch_kv, transfer_load
from services.kv.layout import KvFormatError, decode_header
from services.kv.wire import MAX_REQUEST_ID_BYTES
from services.observe.telemetry import (
    ATTR_COMPLETION_TOKENS,
    ATTR_KV_BYTES,
    ATTR_REQUEST_ID,
    tracer,
)

if TYPE_CHECKING:
    from services.engine.base import Runner
    from services.engine.paged import BlockAllocator, BlockTable

log = logging.getLogger(__name__)
MAX_SLOT_WAIT_S = 60.0  # caps a caller's wait_for_slot_ms (the call's deadline ends it too)
_tracer = tracer(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["DecodeService"].full_name


@dataclass(frozen=True)
class DecodeConfig(WorkerConfig):
    """A decode worker: a model worker plus its paged KV pool."""

    # b_d: requests in the continuous batch. Higher than prefill's b_p because a decode
    # step batches them into one forward; the pool, not this, bounds their KV.
    slots: int = 16
    kv_pool_tokens: int = 32768  # token slots in the paged KV pool (SmolLM2: 45 KiB each)
    kv_pool_block_tokens: int = 16  # tokens per pool block

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_pool_block_tokens <= 0 or self.kv_pool_tokens < self.kv_pool_block_tokens:
            raise ConfigError("need kv_pool_block_tokens > 0 and kv_pool_tokens >= "
                              f"kv_pool_block_tokens, got {self.kv_pool_tokens}, "
                              f"{self.kv_pool_block_tokens}")

    @staticmethod
    def of(cfg: WorkerConfig) -> DecodeConfig:
        """A plain worker config as a decode config (pool settings at their defaults)."""
        if isinstance(cfg, DecodeConfig):
            return cfg
        return DecodeConfig(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})


class DecodeServicer(pb_grpc.DecodeServiceServicer):
    def __init__(self, cfg: DecodeConfig, runtime: ServiceRuntime, runner: Runner,
                 steps: StepLoop, pool: BlockAllocator) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.runner = runner
        self.steps = steps
        self.pool = pool
        # One entry per call, keyed by a per-call number, never by a caller's id: two calls
        # with the same request_id must not share (or free) each other's blocks.
        self.active: dict[int, BlockTable | None] = {}
        self._calls = itertools.count()
        self.view: RegistryView | None = None  # the registry: which kvstores may be dialled
        self.stats = pb.GetDecodeStatsResponse(instance_id=runtime.instance_id, slots=cfg.slots)
        self.waiters = SlotWaiters()

    async def _trusted_kv(self, kv: common_pb2.KvRef, rid: str) -> common_pb2.KvRef:
        """``kv`` with only the endpoints of a kvstore registered in this group (or in any
        group when this one has none, as prefill chooses); FAILED_PRECONDITION otherwise."""
        if self.view is None:
            return kv
        for attempt in range(2):
            stores = self.view.instances(role="kvstore")
            same = [s for s in stores if s.group == self.cfg.group] or stores
            match = next((s for s in same if s.data_address and
                          s.data_address == kv.data_address), None)
            if match is not None:
                return _only_endpoints_of(kv, match)
            if attempt == 0:  # the polled view may lag a just-registered kvstore
                await self.view.refresh()
        raise FailedPrecondition(
            f"the KvRef names data address {kv.data_address[:64]!r}, which is no kvstore "
            f"registered in group {self.cfg.group!r}; refusing to connect to it",
            reason="KVSTORE_NOT_REGISTERED", metadata={"request_id": rid})

    async def _fetch(self, request: pb.DecodeRequest,  # type: ignore[no-untyped-def]
                     table: BlockTable | None, key: int):
        kv, rid = request.kv, request.request_id
        if kv.model_fingerprint and kv.model_fingerprint != self.runner.fingerprint:
            raise FailedPrecondition(
                f"KV comes from model {kv.model_fingerprint[:12]}, this decode serves "
                f"{self.runner.fingerprint[:12]}", reason="KV_MODEL_MISMATCH",
                metadata={"request_id": rid})
        with _tracer.start_as_current_span("kv.fetch") as span:
            span.set_attribute(ATTR_REQUEST_ID, rid)
            span.set_attribute(ATTR_KV_BYTES, int(kv.nbytes))
            kv = await self._trusted_kv(kv, rid)
            await faultpoints.pause("decode.before_fetch")
            fetched = await fetch_kv(self.cfg, kv, rid)
        xfer = fetched.result
        try:
            # Held until the restore has copied it out: over shm these are the kvstore's
            # pages, which it reuses once released (and never, if this is cancelled).
            async with fetched:
                buf = fetched.view
                if table is None:  # a KvRef without num_tokens: size the table from the header
                    table = self.active[key] = self._reserve(request,
                                                             decode_header(buf).num_tokens)
                # RecvScatter into the reserved blocks, on the step thread between steps
                meta, state = await self.steps.run(self.runner.restore_paged, buf, table)
                del buf
        except KvFormatError as e:
            reason = "KV_MODEL_MISMATCH" if "model" in str(e) else "KV_CORRUPT"
            cls = FailedPrecondition if reason == "KV_MODEL_MISMATCH" else Aborted
            raise cls(str(e), reason=reason, metadata={"request_id": rid}) from e
        if kv.num_tokens and meta.num_tokens != kv.num_tokens:
            raise Aborted(f"KV holds {meta.num_tokens} tokens, the KvRef said {kv.num_tokens}",
                          reason="KV_CORRUPT", metadata={"request_id": rid})
        return state, xfer, table

    def _reserve(self, request: pb.DecodeRequest, n: int) -> BlockTable:
        """The request's blocks, before any byte moves (when the KvRef says how many): a
        full pool is a clean rejection."""
        rid = request.request_id
        if n + request.max_new_tokens > self.runner.info.max_context:
            raise InvalidArgument("prompt plus max_new_tokens exceeds the model context",
                                  metadata={"request_id": rid})
        try:
            # +1: the slot of the last token fed, so every step has a slot to write
            return self.pool.allocate(rid, n + request.max_new_tokens + 1)
        except PoolExhausted as e:
            # Same reason as full slots: the gateway tries the next decode, then waits.
            raise ResourceExhausted(f"decode KV pool is full: {e}", reason="DECODE_SLOTS_FULL",
                                    metadata={"request_id": rid}) from e

    def _take(self, request: pb.DecodeRequest, key: int) -> None:
        """A slot, and the request's blocks when the KvRef says how many; raises
        RESOURCE_EXHAUSTED (DECODE_SLOTS_FULL) when either is full."""
        if len(self.active) >= self.cfg.slots:
            raise ResourceExhausted(
                f"all {self.cfg.slots} decode slots are busy", reason="DECODE_SLOTS_FULL",
                metadata={"request_id": request.request_id})
        self.active[key] = None
        if request.kv.num_tokens:
            try:
                self.active[key] = self._reserve(request, int(request.kv.num_tokens))
            except BaseException:
                del self.active[key]
                raise

    async def _admit(self, request: pb.DecodeRequest, key: int) -> None:
        """``_take``, waiting up to ``wait_for_slot_ms`` (FIFO) when this decode is full."""
        loop = asyncio.get_running_loop()
        end = loop.time() + min(request.wait_for_slot_ms / 1e3, MAX_SLOT_WAIT_S)
        handed = waited = False
        while True:
            left = end - loop.time()
            # A newcomer queues behind earlier waiters, unless it cannot wait at all.
            if handed or left <= 0 or not self.waiters:
                try:
                    self._take(request, key)
                    return
                except ResourceExhausted:
                    left = end - loop.time()
                    if left <= 0:
                        raise
            if not waited:
                waited = True
                self.stats.slot_waits_total += 1
            handed = await self.waiters.wait(left, front=handed)

    async def Decode(
        self, request: pb.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DecodeResponse]:
        from services.engine.sampling import Sampling

        rid = request.request_id
        if not rid or not request.kv.handle or len(rid.encode()) > MAX_REQUEST_ID_BYTES:
            await abort_with(context, InvalidArgument(
                f"request_id (1 to {MAX_REQUEST_ID_BYTES} bytes) and kv.handle are required"))
        key = next(self._calls)
        try:
            await self._admit(request, key)
        except ResourceExhausted as e:
            self.stats.full_refusals_total += 1
            await abort_with(context, e)
        except PdserveError as e:
            self.stats.failed_total += 1
            await abort_with(context, e)
        table: BlockTable | None = self.active[key]
        try:
            t0 = time.monotonic()
            state, xfer, table = await self._fetch(request, table, key)
            fetch_ms = (time.monotonic() - t0) * 1e3
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
            seq = DecodeSequence(rid, state, table, request.first_token_id, params,
                                 request.max_new_tokens, stops, asyncio.get_running_loop())
            del state
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
            # Idempotent with the step loop's own free. Safe even while a step is in
            # flight: block contents are only written on the step thread, and a new
            # owner's RecvScatter runs after that step.
            self.pool.free(self.active.pop(key, None))
            self.waiters.wake_one()  # the slot goes to the longest waiter, if any

    async def GetDecodeStats(
        self, request: pb.GetDecodeStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDecodeStatsResponse:
        out = pb.GetDecodeStatsResponse()
        out.CopyFrom(self.stats)
        out.active = len(self.active)
        out.kv_bytes_held = self.pool.used_bytes
        out.steps_total = self.steps.steps_total
        out.step_seconds_total = self.steps.step_seconds_total
        return out

    def load(self) -> dict[str, float]:
        return {"active": float(len(self.active)), "slots": float(self.cfg.slots),
                "kv_bytes_held": float(self.pool.used_bytes),
                "kv_blocks_free": float(self.pool.free_blocks),
                "kv_blocks_total": float(self.pool.num_blocks),
                "batch_max": float(self.steps.max_batch), **transfer_load()}


async def start(cfg: WorkerConfig) -> tuple[ServiceRuntime, DecodeServicer]:
    from services.engine.factory import load_runner

    cfg = DecodeConfig.of(cfg)
    runtime = ServiceRuntime(cfg, "decode", [SERVICE])
    steps = StepLoop()
    # Load on the step thread: the event loop keeps serving health and heartbeats.
    runner = await steps.run(load_runner, cfg.model, cfg.cache_dir, cfg.torch_threads)
    await steps.run(runner.warmup)
    pool = await steps.run(runner.attach_pool, cfg.kv_pool_tokens, cfg.kv_pool_block_tokens)
    steps.runner, steps.pool = runner, pool
    servicer = DecodeServicer(cfg, runtime, runner, steps, pool)
    await runtime.start(lambda s: pb_grpc.add_DecodeServiceServicer_to_server(servicer, s))
    if cfg.redis_url:
        servicer.view = RegistryView(runtime.redis)
        await servicer.view.start()
    try:
        await runtime.serving(worker_info(runtime, cfg, runner.fingerprint), servicer.load)
    except BaseException:  # refused (Redis credentials): stop what started
        await stop(runtime, servicer)
        raise
    return runtime, servicer


async def stop(runtime: ServiceRuntime, servicer: DecodeServicer) -> None:
    async def cleanup() -> None:
        if servicer.view is not None:
            await servicer.view.close()
        servicer.steps.stop()

    await runtime.stop(cleanup)


def _only_endpoints_of(kv: common_pb2.KvRef, store: InstanceInfo) -> common_pb2.KvRef:
    """Keep the endpoints that belong to ``store``: tcp and rdma at its registered data
    address, shm only when it runs on this host (the Unix socket is local by nature)."""
    out = common_pb2.KvRef()
    out.CopyFrom(kv)
    del out.endpoints[:]
    for ep in kv.endpoints:
        if ep.transport in ("tcp", "rdma") and ep.address == store.data_address:
            out.endpoints.append(ep)
        elif ep.transport == "shm" and store.host_id == host_id() and ep.host_id == host_id():
            out.endpoints.append(ep)
    if not out.endpoints:  # the registered data address is always a tcp endpoint
        out.endpoints.append(common_pb2.KvEndpoint(transport="tcp", address=store.data_address,
                                                    protocol="tcp"))
    return out


def main(argv: Sequence[str] | None = None) -> None:
    run_main(DecodeConfig, "decode", start, stop, argv)
