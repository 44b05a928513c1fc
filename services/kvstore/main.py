"""kvstore: the KV relay between prefill and decode.

Lifecycle of the process:
  1. Bind gRPC (control: ReserveKv, ReleaseKv, GetKvStoreStats) and the data plane:
     the TCP data channel always, a Unix socket for ``shm`` when this kernel makes
     memfds (staged buffers then live in memfds), and a Mooncake engine for ``rdma``
     when it is enabled and usable. Register in Redis as role "kvstore" with the
     transports it serves.
  2. Serve. A prefill reserves room and gets every data endpoint; it pushes the
     request's contiguous KV buffer on the best one it can use; the gateway hands
     the KvRef to a decode, which fetches it once (single consumer) and the buffer is
     freed. A sweeper frees leases that nobody consumed in time; ReleaseKv frees on
     cancel or error (by handle, or every entry of a request id). A reservation is capped
     to what one request can need: at most the KV of the served model's whole context
     (``model``), and a lease of at most ``max_lease_s``. A reservation whose caller went
     away before reading the answer is released at once, and so are the entries of a
     gateway (``owner``) that has been out of the registry for two registry TTLs: it died
     holding a KvRef nobody else can release. ``kv_faults`` injects data-plane failures
     (tests).
  3. On SIGTERM: NOT_SERVING, deregister, drain gRPC, close the data channel.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc

from pdserve.v1 import common_pb2
from pdserve.v1 import kvstore_service_pb2 as pb
from pdserve.v1 import kvstore_service_pb2_grpc as pb_grpc
from services.cluster.registry import InstanceInfo, RegistryView
from services.common import faultpoints
from services.common.config import ConfigError, ServiceConfig
from services.common.errors import PdserveError, abort_with
from services.common.runtime import ServiceRuntime, host_id, run_main
from services.common.tasks import cancel_and_wait
from services.kv import KvTransferConfig
from services.kv.negotiate import rdma_usable
from services.kvstore.dataserver import DataServer
from services.kvstore.faults import Faults
from services.kvstore.memory import SegmentPool, heap_segment, memfd_segment, memfd_supported
from services.kvstore.store import Entry, KvStore
from services.observe.telemetry import ATTR_REQUEST_ID, tracer

log = logging.getLogger(__name__)
_tracer = tracer(__name__)


@dataclass(frozen=True)
class KvStoreConfig(KvTransferConfig, ServiceConfig):
    """kvstore settings."""

    data_port: int = 0  # TCP data channel port; 0 picks a free one
    capacity_bytes: int = 4 << 30  # staged KV cap; ReserveKv answers RESOURCE_EXHAUSTED past it
    lease_s: float = 30.0  # default lease of a reservation
    sweep_s: float = 0.5  # how often expired leases are freed
    pool_bytes: int = 1 << 30  # idle staged buffers kept mapped for reuse (no page faults)
    kv_faults: str = ""  # fault injection, e.g. "drop_put@shm#1" (transport/faults.py)
    max_lease_s: float = 300.0  # the longest lease a reservation may ask for
    # The served model (PDSERVE_MODEL, as pdserve up sets it): caps one reservation at
    # the KV of its whole context. Empty, or not readable here: capped at capacity_bytes.
    model: str = ""
    cache_dir: str = ""  # where converted models are cached; empty: ~/.cache/pdserve
    data_idle_s: float = 10.0  # a data connection silent this long (header, push) is closed
    data_max_conns_per_peer: int = 64  # live data connections one peer address may hold

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity_bytes <= 0 or self.lease_s <= 0:
            raise ConfigError("capacity_bytes and lease_s must be positive")
        if not self.lease_s <= self.max_lease_s < float("inf"):
            raise ConfigError(f"need lease_s <= max_lease_s < inf, got {self.lease_s}, "
                              f"{self.max_lease_s}")
        if self.data_idle_s <= 0 or self.data_max_conns_per_peer <= 0:
            raise ConfigError("data_idle_s and data_max_conns_per_peer must be positive")
        try:
            Faults.parse(self.kv_faults)
        except ValueError as e:
            raise ConfigError(f"kv_faults: {e}") from None


class KvStoreServicer(pb_grpc.KvStoreServiceServicer):
    def __init__(self, store: KvStore, instance_id: str, data_address: str,
                 endpoints: list[common_pb2.KvEndpoint], data: DataServer) -> None:
        self.store = store
        self.instance_id = instance_id
        self.data_address = data_address
        self.endpoints = endpoints
        self.data = data

    async def ReserveKv(
        self, request: pb.ReserveKvRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReserveKvResponse:
        with _tracer.start_as_current_span("kvstore.reserve") as span:
            span.set_attribute(ATTR_REQUEST_ID, request.request_id[:128])
            try:
                entry = await self._reserve(request.request_id, request.nbytes,
                                            request.lease_ms, request.owner)
            except PdserveError as e:
                await abort_with(context, e)
            context.add_done_callback(
                lambda ctx, h=entry.handle, r=entry.request_id:
                ctx.cancelled() and self._abandoned(h, r))  # type: ignore[func-returns-value]
            return self._answer(entry)

    async def reserve_on_data_channel(self, request_id: str, nbytes: int, lease_ms: int,
                                      owner: str) -> tuple[bytes, Callable[[], None]]:
        """ReserveKv for a same-host prefill on the data server's Unix socket (one round
        trip on a pooled connection instead of a gRPC call); the data server undoes it
        when the answer cannot be delivered."""
        entry = await self._reserve(request_id, nbytes, lease_ms, owner)
        return self._answer(entry).SerializeToString(), functools.partial(
            self._abandoned, entry.handle, entry.request_id)

    async def _reserve(self, request_id: str, nbytes: int, lease_ms: int,
                       owner: str) -> Entry:
        entry = self.store.reserve(request_id, nbytes, lease_ms / 1000.0, owner=owner)
        # The caller may go away before it reads the handle (cancelled while reserving,
        # or it died): nobody else can ever release this entry, so do it now rather
        # than when the lease ends.
        try:
            await faultpoints.pause("kvstore.reserve")
        except BaseException:
            self._abandoned(entry.handle, entry.request_id)
            raise
        return entry

    def _answer(self, entry: Entry) -> pb.ReserveKvResponse:
        lease_left = entry.lease_expires - self.store.clock()
        return pb.ReserveKvResponse(
            handle=entry.handle,
            data_address=self.data_address,
            transport="tcp",  # the transport of data_address; endpoints has them all
            lease_expires_unix_ms=int((time.time() + lease_left) * 1000),
            endpoints=self.endpoints,
        )

    def _abandoned(self, handle: str, request_id: str) -> None:
        if self.store.release(handle, request_id) is not None:
            log.info("released KV of %s: the caller went away before reading its handle",
                     request_id[:128])

    async def ReleaseKv(
        self, request: pb.ReleaseKvRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseKvResponse:
        before = self.store.release(request.handle, request.request_id)
        if before is not None:
            log.info("released KV of %s (%s): %s", request.request_id[:128], before.name,
                     request.reason[:200])
        return pb.ReleaseKvResponse(
            previous_state=pb.KvState.Name(int(before)) if before is not None else None)

    async def GetKvStoreStats(
        self, request: pb.GetKvStoreStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetKvStoreStatsResponse:
        s, c = self.store, self.store.counters
        return pb.GetKvStoreStatsResponse(
            instance_id=self.instance_id,
            capacity_bytes=s.capacity_bytes,
            bytes_held=s.bytes_held,
            entries=len(s.entries),
            reserved_total=c.reserved_total,
            consumed_total=c.consumed_total,
            aborted_total=c.aborted_total,
            expired_total=c.expired_total,
            rejected_total=c.rejected_total,
            bytes_in_total=c.bytes_in_total,
            bytes_out_total=c.bytes_out_total,
            transfers=dict(self.data.counters),
        )


class KvStoreService:
    """Owns the runtime, the store, the data server and the lease sweeper."""

    def __init__(self, cfg: KvStoreConfig) -> None:
        self.cfg = cfg
        self.runtime = ServiceRuntime(cfg, "kvstore", [pb.DESCRIPTOR.services_by_name[
            "KvStoreService"].full_name])
        # Staged buffers live in memfds when shm is served, so any of them can be handed
        # to a same-host peer without a copy; tcp and rdma serve them the same way.
        self.shm = "shm" in cfg.transports and memfd_supported()
        self.pool = SegmentPool(memfd_segment if self.shm else heap_segment,
                                max_idle_bytes=cfg.pool_bytes)
        self.store = KvStore(cfg.capacity_bytes, cfg.lease_s, allocate=self.pool.allocate,
                             recycle=self.pool.recycle, max_lease_s=cfg.max_lease_s,
                             max_entry_bytes=_max_entry_bytes(cfg))
        self.data = DataServer(self.store, Faults.parse(cfg.kv_faults),
                               max_transfer_s=2 * cfg.kv_transfer_timeout_s,
                               idle_s=cfg.data_idle_s,
                               max_conns_per_peer=cfg.data_max_conns_per_peer)
        self._sweeper: asyncio.Task[None] | None = None
        self.servicer: KvStoreServicer | None = None
        self.view: RegistryView | None = None  # live gateways, for entries' owners
        self._missing_since: dict[str, float] = {}  # owner gateway -> first seen absent

    async def start(self) -> None:
        data_port = await self.data.start(self.cfg.host, self.cfg.data_port, shm=self.shm)
        data_address = self.cfg.advertised(data_port)
        endpoints = self._endpoints(data_address)
        log.info("kvstore data plane: %s", ", ".join(
            f"{e.transport} at {e.address} ({e.protocol})" for e in endpoints))
        self.servicer = KvStoreServicer(self.store, self.runtime.instance_id, data_address,
                                        endpoints, self.data)
        servicer = self.servicer
        self.data.reserver = servicer.reserve_on_data_channel
        await self.runtime.start(lambda s: pb_grpc.add_KvStoreServiceServicer_to_server(
            servicer, s))
        if self.cfg.redis_url:
            self.view = RegistryView(self.runtime.redis)
            await self.view.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="kv-lease-sweeper")
        info = InstanceInfo(
            instance_id=self.runtime.instance_id, role="kvstore", group=self.cfg.group,
            address=self.runtime.address, data_address=data_address,
            transports=tuple(e.transport for e in endpoints),
            host_id=host_id(), started_unix=time.time(),
        )
        try:
            await self.runtime.serving(info, self._load)
        except BaseException:  # refused (Redis credentials): stop what started
            await self.stop()
            raise

    def _endpoints(self, data_address: str) -> list[common_pb2.KvEndpoint]:
        """What this kvstore serves, in its own preference order (clients use theirs)."""
        from services.kv.rdma import engine_for, mooncake_importable

        me = host_id()
        out: list[common_pb2.KvEndpoint] = []
        for name in self.cfg.transports:
            if name == "shm" and self.shm:
                out.append(common_pb2.KvEndpoint(transport="shm", address=self.data.unix_path,
                                                  protocol="memfd", host_id=me))
            elif name == "rdma":
                if not rdma_usable(self.cfg):
                    log.info("rdma not served: %s", "no RDMA device here and "
                             "kv_rdma_tcp_mode is off" if mooncake_importable() else
                             "Mooncake is not installed (the 'rdma' extra)")
                    continue
                host = data_address.rpartition(":")[0].strip("[]")
                self.data.rdma_engine = engine_for(host)
                out.append(common_pb2.KvEndpoint(
                    transport="rdma", address=data_address, host_id=me,
                    protocol=self.data.rdma_engine.protocol))
        # tcp is always served: it is every other path's fallback.
        out.append(common_pb2.KvEndpoint(transport="tcp", address=data_address,
                                          protocol="tcp", host_id=me))
        return out

    def _load(self) -> dict[str, float]:
        return {"bytes_held": float(self.store.bytes_held),
                "capacity_bytes": float(self.store.capacity_bytes),
                "entries": float(len(self.store.entries)), **self.data.transfer_load()}

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sweep_s)
            for e in self.store.expire():
                log.warning("KV lease of %s expired unconsumed (%d bytes freed)",
                            e.request_id, e.nbytes)
            self._release_orphans()

    def _release_orphans(self) -> None:
        """Entries whose owning gateway has left the registry (it died holding the
        KvRef). Only while the view is fresh and shows some gateway (a wiped or unreachable
        Redis shows none: then nothing is released), and only once the owner has been
        missing for two registry TTLs (a view lag or a re-registration is shorter)."""
        view = self.view
        if view is None:
            return
        gateways = {i.instance_id for i in view.instances(role="gateway")}
        if view.failing or not gateways:
            self._missing_since.clear()
            return
        now = time.monotonic()
        grace = 2 * self.cfg.registry_ttl_s
        owners = self.store.owners()
        for owner in owners:
            if owner in gateways:
                self._missing_since.pop(owner, None)
                continue
            since = self._missing_since.setdefault(owner, now)
            if now - since >= grace:
                for e in self.store.release_owned_by(owner):
                    log.warning("released KV of %s: its gateway %s left the registry",
                                e.request_id[:64], owner[:64])
        for gone in set(self._missing_since) - owners:
            del self._missing_since[gone]

    async def stop(self) -> None:
        async def cleanup() -> None:
            if self._sweeper is not None:
                await cancel_and_wait(self._sweeper)
            if self.view is not None:
                await self.view.close()
            await self.data.close()
            self.pool.close()

        await self.runtime.stop(cleanup)


def _max_entry_bytes(cfg: KvStoreConfig) -> int:
    """The largest KV one request of the served model can need: its whole context (0: no
    cap beyond the capacity, when the model is unknown here)."""
    if not cfg.model:
        return 0
    from services.kv.layout import kv_nbytes
    from services.model.info import ModelInfo

    try:
        info = ModelInfo.load(cfg.model, cfg.cache_dir)
    except (OSError, ValueError, KeyError) as e:
        log.warning("cannot read model %r here (%s): a reservation is capped at the capacity",
                    cfg.model, e)
        return 0
    cap = kv_nbytes(info.num_layers, info.num_kv_heads, info.head_dim, info.max_context,
                    info.kv_dtype)
    log.info("one reservation is capped at %d bytes (%s, %d tokens)", cap, info.name,
             info.max_context)
    return cap


async def start(cfg: KvStoreConfig) -> tuple[KvStoreService]:
    svc = KvStoreService(cfg)
    await svc.start()
    return (svc,)


async def stop(svc: KvStoreService) -> None:
    await svc.stop()


def main(argv: Sequence[str] | None = None) -> None:
    run_main(KvStoreConfig, "kvstore", start, stop, argv)
