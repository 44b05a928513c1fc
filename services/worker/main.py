"""worker: one model process that serves prefill or decode, and switches at runtime.

Lifecycle of the process: bind gRPC with PrefillService, DecodeService (both routed
to whichever role it serves; the other answers "not here" the way a full instance
does) and WorkerControlService; load the model on the step thread (``preload``),
then register in Redis as role ``--role`` (``idle`` by default: the spare pool) and
turn SERVING. ``WorkerControlService`` (Assign, Drain, Release) switches the role
without restarting the process: drain, re-register, build the new role's servicer
over the kept weights and paged pool (``host.RoleHost``). On SIGTERM it drains
(within ``grace_s``), deregisters and stops.

Design note (the service boundary): services never import each other, with one
stated exception, in the import-linter contract (pyproject.toml, checked by
tests/unit/test_import_contracts.py): ``services.worker``
hosts the prefill and decode roles, so it imports their servicer modules
(``services.prefill.{main,servicer,handoff}``, ``services.decode.{main,steploop}``).
The dependency is one-way (prefill and decode never import worker) and nothing else
imports them. ``pdserve serve prefill|decode`` keep working unchanged.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc

from pdserve.v1 import admin_service_pb2 as apb
from pdserve.v1 import admin_service_pb2_grpc as apb_grpc
from pdserve.v1 import decode_service_pb2 as dpb
from pdserve.v1 import decode_service_pb2_grpc as dpb_grpc
from pdserve.v1 import prefill_service_pb2 as ppb
from pdserve.v1 import prefill_service_pb2_grpc as ppb_grpc
from services.common.errors import PdserveError, abort_with
from services.common.runtime import ServiceRuntime, run_main
from services.decode.main import SERVICE as DECODE_SERVICE
from services.prefill.main import SERVICE as PREFILL_SERVICE
from services.worker.host import (
    HostConfig,
    Relay,
    RoleHost,
    empty_decode_stats,
    empty_prefill_stats,
    not_decode,
    not_prefill,
)

CONTROL_SERVICE = apb.DESCRIPTOR.services_by_name["WorkerControlService"].full_name


class PrefillProxy(ppb_grpc.PrefillServiceServicer):
    def __init__(self, host: RoleHost) -> None:
        self.host, self.relay = host, Relay(host)

    async def Prefill(self, request: ppb.PrefillRequest, context: grpc.aio.ServicerContext,
                      ) -> AsyncIterator[ppb.PrefillResponse]:
        sv = self.host.serving("prefill")
        if sv is None:
            yield not_prefill(self.host)
            return
        async for msg in self.relay.stream(sv.Prefill(request, context), context,  # type: ignore[union-attr]
                                           f"prefill of {request.request_id}"):
            yield msg

    async def GetPrefillStats(self, request: ppb.GetPrefillStatsRequest,
                              context: grpc.aio.ServicerContext) -> ppb.GetPrefillStatsResponse:
        sv = self.host.prefill_sv
        if sv is None:
            return empty_prefill_stats(self.host)
        return await sv.GetPrefillStats(request, context)


class DecodeProxy(dpb_grpc.DecodeServiceServicer):
    def __init__(self, host: RoleHost) -> None:
        self.host, self.relay = host, Relay(host)

    async def Decode(self, request: dpb.DecodeRequest, context: grpc.aio.ServicerContext,
                     ) -> AsyncIterator[dpb.DecodeResponse]:
        sv = self.host.serving("decode")
        if sv is None:
            await abort_with(context, not_decode(self.host))
        async for msg in self.relay.stream(sv.Decode(request, context), context,  # type: ignore[union-attr]
                                           f"decode of {request.request_id}"):
            yield msg

    async def GetDecodeStats(self, request: dpb.GetDecodeStatsRequest,
                             context: grpc.aio.ServicerContext) -> dpb.GetDecodeStatsResponse:
        sv = self.host.decode_sv
        if sv is None:
            return empty_decode_stats(self.host)
        return await sv.GetDecodeStats(request, context)


class WorkerControl(apb_grpc.WorkerControlServiceServicer):
    def __init__(self, host: RoleHost) -> None:
        self.host = host

    async def GetWorkerStatus(self, request: apb.GetWorkerStatusRequest,
                              context: grpc.aio.ServicerContext) -> apb.WorkerStatus:
        return self.host.status()

    async def Assign(self, request: apb.AssignRequest,
                     context: grpc.aio.ServicerContext) -> apb.WorkerStatus:
        try:
            await self.host.assign(request.role, request.group, dict(request.settings),
                                   request.timeout_s, request.fence)
        except PdserveError as e:
            await abort_with(context, e)
        return self.host.status()

    async def Drain(self, request: apb.DrainRequest,
                    context: grpc.aio.ServicerContext) -> apb.WorkerStatus:
        try:
            await self.host.drain(request.timeout_s, request.fence)
        except PdserveError as e:
            await abort_with(context, e)
        return self.host.status()

    async def Release(self, request: apb.ReleaseRequest,
                      context: grpc.aio.ServicerContext) -> apb.WorkerStatus:
        try:
            await self.host.release(request.timeout_s, request.fence)
        except PdserveError as e:
            await abort_with(context, e)
        return self.host.status()


async def start(cfg: HostConfig) -> tuple[ServiceRuntime, RoleHost]:
    runtime = ServiceRuntime(cfg, "worker", [PREFILL_SERVICE, DECODE_SERVICE, CONTROL_SERVICE])
    host = RoleHost(cfg, runtime)

    def add(server: grpc.aio.Server) -> None:
        ppb_grpc.add_PrefillServiceServicer_to_server(PrefillProxy(host), server)
        dpb_grpc.add_DecodeServiceServicer_to_server(DecodeProxy(host), server)
        apb_grpc.add_WorkerControlServiceServicer_to_server(WorkerControl(host), server)

    await runtime.start(add)
    await host.start()
    return runtime, host


async def stop(runtime: ServiceRuntime, host: RoleHost) -> None:
    await host.close()
    await runtime.stop()


def main(argv: Sequence[str] | None = None) -> None:
    run_main(HostConfig, "worker", start, stop, argv)
