"""admin: the fleet's group operations (``pdserve group ...``) as a gRPC service.

Lifecycle of the process: bind gRPC (AdminService, health, reflection), register in
Redis as role "admin", turn SERVING; with ``auto_substitute`` also watch the members
(lapsed lease or failed health checks) and substitute failed ones from the spare pool.
On SIGTERM: NOT_SERVING, deregister, let a running operation finish within ``grace_s``.

Why its own process and not the gateway (which also watches the registry): operations
run for minutes (drains, model loads) and must not share fate or CPU with the data
path; gateways are replicated, so each would need the lock anyway; and killing a
gateway (a fault the substitution bench injects) must not cut an operation short.
Operations act through ``services.control.actuators_local.WorkerActuator``; see
``ops.py`` for what each does.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc

from pdserve.v1 import admin_service_pb2 as apb
from pdserve.v1 import admin_service_pb2_grpc as apb_grpc
from services.admin.ops import Events, GroupOps
from services.cluster.registry import InstanceInfo
from services.common.config import ConfigError, ServiceConfig
from services.common.errors import FailedPrecondition, PdserveError, abort_with
from services.common.runtime import ServiceRuntime, host_id, run_main
from services.common.tasks import cancel_and_wait
from services.control.actuator import ActuatorError
from services.control.actuators_local import WorkerActuator

SERVICE = apb.DESCRIPTOR.services_by_name["AdminService"].full_name


@dataclass(frozen=True)
class AdminConfig(ServiceConfig):
    """Admin service settings."""

    auto_substitute: bool = False  # watch members and substitute failed ones from spares
    watch_s: float = 2.0  # how often the watch looks (health checks, lapsed leases)
    fail_after: int = 3  # consecutive failed health checks that make an instance failed
    op_timeout_s: float = 60.0  # per step (a drain) when a request leaves timeout_s at 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.watch_s <= 0 or self.fail_after < 1 or self.op_timeout_s <= 0:
            raise ConfigError("need watch_s > 0, fail_after >= 1 and op_timeout_s > 0")


class AdminServicer(apb_grpc.AdminServiceServicer):
    def __init__(self, cfg: AdminConfig, ops: GroupOps) -> None:
        self.cfg, self.ops = cfg, ops

    async def _run(self, events: Events, context: grpc.aio.ServicerContext,
                   ) -> AsyncIterator[apb.OpEvent]:
        if self.ops.lock.locked():
            await abort_with(context, FailedPrecondition(
                "another group operation is running; retry when it ends",
                reason="OPERATION_RUNNING"))
        async with self.ops.lock:
            try:
                async with contextlib.aclosing(events) as it:
                    async for e in it:
                        yield e
            except PdserveError as e:
                await abort_with(context, e)
            except ActuatorError as e:
                await abort_with(context, FailedPrecondition(
                    f"the operation stopped: {e}; finished steps stay (every step is "
                    "idempotent, so running it again resumes)", reason="STEP_FAILED"))

    def _timeout(self, t: float) -> float:
        return t or self.cfg.op_timeout_s

    async def ListGroups(self, request: apb.ListGroupsRequest,
                         context: grpc.aio.ServicerContext) -> apb.ListGroupsResponse:
        return await self.ops.list_groups()

    # Handlers are async generators themselves: grpc.aio tells streaming handlers apart
    # by inspecting the function, so one that returns a generator is taken as sync.
    async def ScaleOut(self, request: apb.ScaleOutRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[apb.OpEvent]:
        async for e in self._run(self.ops.scale_out(
                request.group, request.prefill, request.decode,
                self._timeout(request.timeout_s)), context):
            yield e

    async def ScaleIn(self, request: apb.ScaleInRequest,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[apb.OpEvent]:
        async for e in self._run(self.ops.scale_in(request.group,
                                                   self._timeout(request.timeout_s)), context):
            yield e

    async def RollingUpgrade(self, request: apb.RollingUpgradeRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[apb.OpEvent]:
        async for e in self._run(self.ops.upgrade(list(request.groups), dict(request.settings),
                                                  self._timeout(request.timeout_s)), context):
            yield e

    async def Substitute(self, request: apb.SubstituteRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[apb.OpEvent]:
        async for e in self._run(self.ops.substitute(request.instance_id,
                                                     self._timeout(request.timeout_s)),
                                 context):
            yield e


@dataclass
class Admin:
    runtime: ServiceRuntime
    ops: GroupOps
    watch: asyncio.Task[None] | None


async def start(cfg: AdminConfig) -> tuple[Admin]:
    runtime = ServiceRuntime(cfg, "admin", [SERVICE])
    actuator = WorkerActuator(runtime.redis)
    ops = GroupOps(runtime.redis, actuator, cfg.fail_after)
    servicer = AdminServicer(cfg, ops)
    await runtime.start(lambda s: apb_grpc.add_AdminServiceServicer_to_server(servicer, s))
    await ops.instances()  # the members seen so far (a lapsed lease needs the last record)
    watch = (asyncio.create_task(ops.watch(cfg.watch_s, cfg.op_timeout_s), name="admin-watch")
             if cfg.auto_substitute else None)
    await runtime.serving(InstanceInfo(
        instance_id=runtime.instance_id, role="admin", group=cfg.group,
        address=runtime.address, host_id=host_id(), started_unix=time.time()))
    return (Admin(runtime, ops, watch),)


async def stop(admin: Admin) -> None:
    async def cleanup() -> None:
        if admin.watch is not None:
            await cancel_and_wait(admin.watch)
        await admin.ops.act.close()

    await admin.runtime.stop(cleanup)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(AdminConfig, "admin", start, stop, argv)
