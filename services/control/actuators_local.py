"""The ``Actuator`` for role-switchable worker processes (services/worker): it finds an
instance in the registry and drives it over its ``WorkerControlService``. It works
wherever the workers run (``pdserve up``, compose, bare metal, or pods that host
workers); scaling the number of processes is the supervisor's job (the launcher's
spare pool, a Deployment), so ``scale`` is not offered.

Also here: ``mark_removed``, the substitution's first step (P/D-Serve §1.4: "mark the
failed instance as logically removed so nothing more is forwarded or transferred to
it"): the record goes at once instead of when its lease lapses, and a tombstone
(``removed_key``, with a TTL) tells a zombie that still beats (its gRPC broken, its
event loop alive) to stop re-registering: workers check it every heartbeat and leave.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc

from pdserve.v1 import admin_service_pb2 as apb
from pdserve.v1 import admin_service_pb2_grpc as apb_grpc
from services.cluster.keys import instance_key, members_key
from services.cluster.registry import InstanceInfo, list_instances
from services.common.errors import error_info
from services.common.runtime import new_channel
from services.control.actuator import (
    ActuatorError,
    Capabilities,
    InstanceStatus,
    StaleFence,
    State,
)

log = logging.getLogger(__name__)
IDLE, DRAINING = "idle", "draining"  # worker registry roles (services/worker/host.py)
_STATES = {
    apb.WORKER_STATE_STARTING: State.STARTING, apb.WORKER_STATE_SERVING: State.SERVING,
    apb.WORKER_STATE_DRAINING: State.DRAINING, apb.WORKER_STATE_DRAINED: State.DRAINED,
    apb.WORKER_STATE_IDLE: State.IDLE,
}
_GRACE_S = 15.0  # on top of a step's own timeout: the worker answers after its drain


TOMBSTONE_S = 600.0  # how long a removed instance's id stays barred from its group


def removed_key(group: str, instance_id: str) -> str:
    """Tombstone of an instance marked removed (same hash tag as the group's keys)."""
    return f"pdserve:{{{group}}}:removed:{instance_id}"


async def mark_removed(client: Any, group: str, instance_id: str,
                       tombstone_s: float = TOMBSTONE_S) -> None:
    """Drop an instance's registry record now and bar its id from the group for
    ``tombstone_s`` (one group's slot: Cluster-safe)."""
    async with client.pipeline(transaction=True) as pipe:
        pipe.srem(members_key(group), instance_id)
        pipe.delete(instance_key(group, instance_id))
        if tombstone_s > 0:
            pipe.set(removed_key(group, instance_id), "1", px=int(tombstone_s * 1000))
        await pipe.execute()


class WorkerActuator:
    """``services.control.actuator.Actuator`` over worker processes."""

    capabilities = Capabilities(assign=True, scale=False)

    def __init__(self, client: Any) -> None:
        self.client = client
        self._stubs: dict[str, tuple[grpc.aio.Channel, apb_grpc.WorkerControlServiceStub]] = {}

    async def close(self) -> None:
        for ch, _ in self._stubs.values():
            await ch.close()
        self._stubs.clear()

    def _stub(self, address: str) -> apb_grpc.WorkerControlServiceStub:
        if address not in self._stubs:
            ch = new_channel(address)
            self._stubs[address] = (ch, apb_grpc.WorkerControlServiceStub(ch))
        return self._stubs[address][1]

    async def find(self, instance_id: str) -> InstanceInfo | None:
        return next((i for i in await list_instances(self.client)
                     if i.instance_id == instance_id), None)

    async def worker_status(self, instance_id: str) -> apb.WorkerStatus | None:
        info = await self.find(instance_id)
        if info is None:
            return None
        try:
            return await self._stub(info.address).GetWorkerStatus(
                apb.GetWorkerStatusRequest(), timeout=3)
        except grpc.aio.AioRpcError:
            return None

    async def status(self, instance_id: str) -> InstanceStatus:
        info = await self.find(instance_id)
        if info is None:
            return InstanceStatus(instance_id, State.GONE)
        try:
            st = await self._stub(info.address).GetWorkerStatus(apb.GetWorkerStatusRequest(),
                                                               timeout=3)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.UNIMPLEMENTED and info.role in ("prefill", "decode"):
                # a per-role process: it serves, but cannot be switched
                return InstanceStatus(instance_id, State.SERVING, info.role, info.group)
            return InstanceStatus(instance_id, State.GONE)
        return InstanceStatus(instance_id, _STATES.get(st.state, State.GONE), st.role,
                              st.group, st.in_flight)

    async def replicas(self, group: str, role: str) -> int:
        return sum(1 for i in await list_instances(self.client, group) if i.role == role)

    async def _call(self, instance_id: str, what: str, timeout_s: float,
                    request: Any) -> apb.WorkerStatus:
        info = await self.find(instance_id)
        if info is None:
            raise ActuatorError(f"{instance_id} is not registered (gone?)", retryable=False)
        method = getattr(self._stub(info.address), what)
        try:
            out: apb.WorkerStatus = await method(request, timeout=timeout_s + _GRACE_S)
            return out
        except grpc.aio.AioRpcError as e:
            info = error_info(e)
            reason = info.reason if info is not None else e.code().name
            if reason == "STALE_FENCE":
                raise StaleFence(f"{instance_id}: {e.details()}") from e
            if e.code() == grpc.StatusCode.UNIMPLEMENTED:
                raise ActuatorError(f"{instance_id} is a per-role process and cannot switch "
                                    "roles (run it as pdserve serve worker)",
                                    retryable=False) from e
            raise ActuatorError(f"{what} {instance_id}: {reason}: {e.details()}",
                                retryable=e.code() in (grpc.StatusCode.UNAVAILABLE,
                                                       grpc.StatusCode.DEADLINE_EXCEEDED)) from e

    async def drain(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        await self._call(instance_id, "Drain", timeout_s,
                         apb.DrainRequest(fence=fence, timeout_s=timeout_s))

    async def assign(self, instance_id: str, role: str, group: str, *, fence: int,
                     timeout_s: float, settings: dict[str, str] | None = None) -> None:
        await self._call(instance_id, "Assign", timeout_s + 120.0,  # + loading a model
                         apb.AssignRequest(role=role, group=group, fence=fence,
                                           timeout_s=timeout_s, settings=settings or {}))

    async def release(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        await self._call(instance_id, "Release", timeout_s,
                         apb.ReleaseRequest(fence=fence, timeout_s=timeout_s))

    async def scale(self, group: str, role: str, replicas: int, *, fence: int,
                    timeout_s: float) -> None:
        raise ActuatorError("worker processes are switched, not scaled: the supervisor "
                            "(pdserve up --spares, a Deployment) keeps the spare pool",
                            retryable=False)

    async def spares(self) -> list[InstanceInfo]:
        """Idle workers (the spare pool), any group."""
        return [i for i in await list_instances(self.client) if i.role == IDLE]
