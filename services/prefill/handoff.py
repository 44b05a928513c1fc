"""The KV handoff of one prefill: reserve at a kvstore, push, then the ``KvRef`` for
``kv_ready``; release on any failure or cancel.

The reservation comes before the compute (P/D-Serve reserves for every admitted
prompt that a decode continues; a ``first_token_only`` request stages nothing), so a
full kvstore becomes a rejection the gateway can forward around, and its lease covers
the compute ahead (``reservation_lease_ms``). With ``kv_layer_overlap``
(tcp only) each layer is packed and sent as soon as the forward has computed it, and
only the header is left after compute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from opentelemetry import trace

from pdserve.v1 import common_pb2, kvstore_service_pb2
from pdserve.v1 import prefill_service_pb2 as pb
from pdserve.v1.kvstore_service_pb2_grpc import KvStoreServiceStub as KvStoreStub
from services.cluster.registry import RegistryView
from services.common.errors import PdserveError, Unavailable, error_info, from_rpc_error
from services.common.runtime import host_id, new_channel
from services.engine.worker import ModelThread, WorkerConfig
from services.kv import TransferError, push_kv
from services.kv.layers import LayerPush
from services.kv.layout import kv_nbytes
from services.kv.reserve import reserve_over_channel
from services.observe.telemetry import ATTR_KV_BYTES, ATTR_REQUEST_ID, tracer
from services.prefill.estimator import PrefillEstimator, reservation_lease_ms

if TYPE_CHECKING:
    from services.engine.base import KvState, Runner
    from services.engine.kv import LayerPacker

log = logging.getLogger(__name__)
_tracer = tracer(__name__)
RESERVE_TIMEOUT_S = 10.0
ATTR_KV_LAYERED = "pdserve.kv.layered"


@dataclass
class _Layered:
    """A per-layer push in flight and the buffer its layers are packed into."""

    push: LayerPush
    packer: LayerPacker

    def on_layer(self, i: int, cache: object) -> None:  # on the model thread
        self.packer(i, cache)
        self.push.layer_done(i)


class Staged:
    """One request's reservation at a kvstore, from reserve to ``kv_ready``."""

    def __init__(self, cfg: WorkerConfig, runner: Runner, thread: ModelThread, rid: str,
                 address: str, kvstore: KvStoreStub,
                 res: kvstore_service_pb2.ReserveKvResponse) -> None:
        self.cfg, self.runner, self.thread, self.rid = cfg, runner, thread, rid
        self.address, self.kvstore, self.res = address, kvstore, res
        self.layered: _Layered | None = None

    async def open_layered(self, num_tokens: int) -> None:
        """Per-layer transfer when it is on, the runner can hook its layers and the
        push goes over tcp; otherwise the KV is packed and pushed after compute."""
        if not self.cfg.kv_layer_overlap:
            return
        packer = self.runner.layer_packer(num_tokens)
        if packer is None:
            return
        push = await LayerPush.open(self.cfg, self.res, self.rid, packer.buf,
                                    packer.meta.num_layers, self.cfg.kv_checksum, host_id())
        self.layered = _Layered(push, packer) if push is not None else None

    def hook(self) -> tuple[object, ...]:
        """Extra arguments for the compute: the per-layer callback, if any."""
        return (self.layered.on_layer,) if self.layered is not None else ()

    async def push(self, state: KvState, time_left: float | None) -> common_pb2.KvRef:
        """Pack (unless the layers went already) and push; the ref decode fetches."""
        layered = self.layered
        if layered is None:
            meta, buf = await self.thread.run(self.runner.pack, state, self.cfg.kv_checksum)
        with _tracer.start_as_current_span("kv.push") as span:
            span.set_attribute(ATTR_REQUEST_ID, self.rid)
            span.set_attribute(ATTR_KV_LAYERED, layered is not None)
            if layered is not None:  # the layers went during compute; the header now
                xfer = await layered.push.finish(layered.packer.header, time_left)
                meta, buf = layered.packer.meta, layered.packer.buf
            else:
                xfer = await push_kv(self.cfg, self.res, self.rid, buf, meta.num_tokens,
                                     time_left)
            span.set_attribute(ATTR_KV_BYTES, int(buf.nbytes))
        return common_pb2.KvRef(
            handle=self.res.handle, control_address=self.address,
            data_address=self.res.data_address, transport=xfer.transport, nbytes=buf.nbytes,
            num_tokens=meta.num_tokens, model_fingerprint=self.runner.fingerprint,
            endpoints=self.res.endpoints, fallback=xfer.fallback)

    async def release(self, reason: str) -> None:
        """Abort a per-layer push in flight and free the reservation (idempotent at the
        kvstore). Shielded: this runs while the call is being cancelled."""
        if self.layered is not None:
            self.layered.push.abort()
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            await asyncio.shield(self.kvstore.ReleaseKv(kvstore_service_pb2.ReleaseKvRequest(
                handle=self.res.handle, request_id=self.rid, reason=reason), timeout=5))


def traced() -> bool:
    """True when this request's spans are recorded (an exporter is set up)."""
    return trace.get_current_span().is_recording()


class Handoff:
    """Chooses a kvstore of the group and reserves there."""

    def __init__(self, cfg: WorkerConfig, runner: Runner, thread: ModelThread,
                 kv_lease_s: float) -> None:
        self.cfg, self.runner, self.thread = cfg, runner, thread
        self.kv_lease_s = kv_lease_s
        self.view: RegistryView | None = None
        self._channels: dict[str, KvStoreStub] = {}
        self._unix_paths: dict[str, str] = {}  # kvstore address -> its Unix socket here
        self._unreachable: set[str] = set()  # Unix sockets that failed from here
        self._background: set[asyncio.Task[None]] = set()

    def _kvstore(self, avoid: str = "") -> tuple[str, KvStoreStub]:
        """The group's least-loaded kvstore (any group's when it has none); ``avoid`` one
        that just proved unreachable, unless it is the only one."""
        stores = self.view.instances(role="kvstore") if self.view else []
        same = [s for s in stores if s.group == self.cfg.group] or stores
        if not same:
            raise Unavailable("no kvstore instance is registered; start one "
                              "(pdserve serve kvstore)", reason="NO_KVSTORE")
        same = [s for s in same if s.address != avoid] or same
        best = min(same, key=lambda s: (s.load.get("bytes_held", 0.0), s.instance_id))
        if best.address not in self._channels:
            self._channels[best.address] = KvStoreStub(new_channel(best.address))
        return best.address, self._channels[best.address]

    async def reserve(self, request: pb.PrefillRequest, estimator: PrefillEstimator,
                      ) -> Staged | pb.PrefillRejected:
        """A reservation for the whole prompt's KV, or a rejection (KV_CAPACITY) that
        the gateway forwards around when the request may be rejected. An unreachable
        kvstore is tried once more after a registry refresh: a restarted kvstore (new
        address, same id) or another one of the group takes the request."""
        rid = request.request_id
        info = self.runner.info
        n = len(request.prompt_token_ids)
        nbytes = kv_nbytes(info.num_layers, info.num_kv_heads, info.head_dim, n, info.kv_dtype)
        address, kvstore = self._kvstore()
        req = kvstore_service_pb2.ReserveKvRequest(
            request_id=rid, nbytes=nbytes, owner=request.gateway_id,
            lease_ms=reservation_lease_ms(self.kv_lease_s, estimator, n))
        for attempt in range(2):
            call = asyncio.ensure_future(self._reserve_call(address, kvstore, req))
            try:
                # Shielded: cancelled while the kvstore reserves, we still learn the handle
                # and release it at once (else it would be held until its lease ends).
                res = await asyncio.shield(call)
            except asyncio.CancelledError:
                self._release_when_reserved(call, kvstore, rid)
                raise
            except grpc.aio.AioRpcError as e:
                if error_info(e) is None:  # no answer from the kvstore itself
                    if attempt == 0 and self.view is not None:
                        await self.view.refresh()
                        retry = self._kvstore(avoid=address)
                        if retry[0] != address:
                            address, kvstore = retry
                            continue
                    raise Unavailable(f"the kvstore at {address} is unreachable: {e.details()}",
                                      reason="KVSTORE_UNAVAILABLE",
                                      metadata={"request_id": rid, "kvstore": address}) from e
                err = from_rpc_error(e, "reserving KV at the kvstore", request_id=rid)
                return self._refused(request, err)
            except PdserveError as err:  # refused over the Unix socket
                err.message = f"reserving KV at the kvstore: {err.message}"
                err.metadata["request_id"] = rid
                return self._refused(request, err)
            return Staged(self.cfg, self.runner, self.thread, rid, address, kvstore, res)
        raise AssertionError("unreachable")

    @staticmethod
    def _refused(request: pb.PrefillRequest, err: PdserveError) -> pb.PrefillRejected:
        """A full kvstore is a rejection the gateway forwards around (when the request
        may be rejected); any other refusal is the request's error."""
        if err.reason == "KV_CAPACITY" and \
                request.admission_mode == pb.ADMISSION_MODE_REJECT_IF_BUSY:
            return pb.PrefillRejected(reason=pb.REJECT_REASON_KV_CAPACITY, message=err.message)
        raise err

    async def _reserve_call(self, address: str, kvstore: KvStoreStub,
                            req: kvstore_service_pb2.ReserveKvRequest,
                            ) -> kvstore_service_pb2.ReserveKvResponse:
        """On the kvstore's Unix socket when it runs on this host (``services.kv.reserve``:
        no gRPC call), else, or when that fails to connect, over gRPC. A traced request
        uses gRPC, so the reservation's spans join its trace."""
        path = self._unix_paths.get(address)
        if path and not traced():
            try:
                async with asyncio.timeout(RESERVE_TIMEOUT_S):
                    return await reserve_over_channel(path, req.request_id, req.nbytes,
                                                      req.lease_ms, req.owner)
            except (TransferError, TimeoutError) as e:
                # Not tried again: a restarted kvstore has a new socket, learnt from the
                # gRPC answer; one this process cannot reach stays on gRPC.
                log.info("reserving on %s failed (%s); asking over gRPC", path, e)
                self._unix_paths.pop(address, None)
                self._unreachable.add(path)
        res = await kvstore.ReserveKv(req, timeout=RESERVE_TIMEOUT_S)
        if "shm" in self.cfg.transports:
            me = host_id()
            self._unix_paths[address] = next(
                (ep.address for ep in res.endpoints if ep.transport == "shm"
                 and ep.host_id == me and ep.address not in self._unreachable), "")
        return res

    def _release_when_reserved(self, call: asyncio.Future[kvstore_service_pb2.ReserveKvResponse],
                               kvstore: KvStoreStub, rid: str) -> None:
        async def release() -> None:
            try:
                res = await call
            except (grpc.aio.AioRpcError, asyncio.CancelledError):
                return  # nothing was reserved
            with contextlib.suppress(grpc.aio.AioRpcError):
                await kvstore.ReleaseKv(kvstore_service_pb2.ReleaseKvRequest(
                    handle=res.handle, request_id=rid,
                    reason="prefill cancelled while reserving"), timeout=5)

        task = asyncio.get_running_loop().create_task(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
