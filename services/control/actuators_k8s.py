"""The ``Actuator`` for Kubernetes: one Deployment per (group, role), scaled through its
Scale subresource with lightkube (pinned in pyproject).

Naming: ``deployment_name`` (default ``<group>-<role>``, as deploy/k8s names them), in
``namespace``.
Kubernetes cannot switch a pod's role in place (the role is in the pod spec), so this
actuator is scale-only (``Capabilities(assign=False, scale=True)``): the controller's
plans become absolute replica targets ("group g has 5 decode replicas"), which are
idempotent by construction. A fixed-total move is "remove one here, then add one there".

Each ``scale`` call:
  1. GET the Deployment (404: a clear, non-retryable error naming it).
  2. Fencing: the highest token that acted on it is kept in the annotation
     ``pdserve.io/fence``; a lower token is refused (``StaleFence``) before any change.
     The annotation is written with the Deployment's ``resourceVersion`` (optimistic
     concurrency: two actors racing get a 409, and the loser retries or is stale).
  3. PATCH ``.../deployments/<name>/scale`` with ``{"spec": {"replicas": n}}``
     (merge patch).
  4. Poll the Scale until ``status.replicas`` reaches ``n`` or ``timeout_s`` passes
     (then a retryable error: the plan stays pending and resumes next period).

Scale-in removes pods that Kubernetes picks; each pdserve service drains on SIGTERM
(it leaves the registry first, then finishes in-flight work within ``grace_s``), so set
the pods' ``terminationGracePeriodSeconds`` above ``grace_s`` (docs/operations.md).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.resources.apps_v1 import Deployment
from lightkube.types import PatchType

from services.cluster.registry import list_instances
from services.control.actuator import (
    ActuatorError,
    Capabilities,
    InstanceStatus,
    StaleFence,
    State,
)

FENCE_ANNOTATION = "pdserve.io/fence"


def default_name(group: str, role: str) -> str:
    return f"{group}-{role}"  # deploy/k8s (scripts/gen_k8s.py): namePrefix "<group>-"


class KubernetesActuator:
    """``services.control.actuator.Actuator`` over per-(group, role) Deployments."""

    capabilities = Capabilities(assign=False, scale=True)

    def __init__(self, client: AsyncClient | None = None, namespace: str = "default",
                 deployment_name: Callable[[str, str], str] = default_name,
                 registry: Any = None, poll_s: float = 1.0) -> None:
        """``client``: a lightkube AsyncClient (default: in-cluster or ~/.kube/config).
        ``registry``: a Redis client, for per-instance ``status`` (optional)."""
        self.client = client or AsyncClient(namespace=namespace)
        self.namespace = namespace
        self.name = deployment_name
        self.registry = registry
        self.poll_s = poll_s

    @staticmethod
    def for_server(url: str, namespace: str = "default", token: str = "",
                   **kw: Any) -> KubernetesActuator:
        """An actuator talking to the API server at ``url`` with a bearer ``token``
        (a ServiceAccount's; none behind ``kubectl proxy``)."""
        config = KubeConfig.from_one(cluster=Cluster(server=url),
                                     user=User(token=token or None), namespace=namespace)
        client = AsyncClient(config, namespace=namespace)
        return KubernetesActuator(client, namespace, **kw)

    async def close(self) -> None:
        await self.client.close()

    async def status(self, instance_id: str) -> InstanceStatus:
        if self.registry is not None:
            for i in await list_instances(self.registry):
                if i.instance_id == instance_id:
                    return InstanceStatus(instance_id, State.SERVING, i.role, i.group)
        return InstanceStatus(instance_id, State.GONE)

    async def _deployment(self, name: str) -> Deployment:
        try:
            return await self.client.get(Deployment, name, namespace=self.namespace)
        except ApiError as e:
            if e.status.code == 404:
                raise ActuatorError(f"no Deployment {self.namespace}/{name}; create one per "
                                    "(group, role) (docs/operations.md)",
                                    retryable=False) from e
            raise ActuatorError(f"reading Deployment {name}: {e.status.message}") from e

    async def replicas(self, group: str, role: str) -> int:
        name = self.name(group, role)
        try:
            scale = await self.client.get(Deployment.Scale, name, namespace=self.namespace)
        except ApiError as e:
            if e.status.code == 404:
                return 0
            raise ActuatorError(f"reading {name}/scale: {e.status.message}") from e
        return int(scale.spec.replicas or 0) if scale.spec else 0

    async def _fence(self, dep: Deployment, name: str, fence: int) -> None:
        meta = dep.metadata
        seen = int((meta.annotations or {}).get(FENCE_ANNOTATION, "0")) if meta else 0
        if fence and fence < seen:
            raise StaleFence(f"fencing token {fence} is older than {seen} on {name}")
        if fence and fence > seen:
            patch = {"metadata": {"annotations": {FENCE_ANNOTATION: str(fence)},
                                  "resourceVersion": meta.resourceVersion if meta else None}}
            try:
                await self.client.patch(Deployment, name, patch, namespace=self.namespace,
                                        patch_type=PatchType.MERGE)
            except ApiError as e:
                if e.status.code == 409:  # someone acted on it since our read
                    raise ActuatorError(f"{name} changed under us (409); retrying") from e
                raise ActuatorError(f"annotating {name}: {e.status.message}") from e

    async def scale(self, group: str, role: str, replicas: int, *, fence: int,
                    timeout_s: float) -> None:
        if replicas < 0:
            raise ActuatorError(f"replicas must be >= 0, got {replicas}", retryable=False)
        name = self.name(group, role)
        dep = await self._deployment(name)
        await self._fence(dep, name, fence)
        try:
            await self.client.patch(Deployment.Scale, name, {"spec": {"replicas": replicas}},
                                    namespace=self.namespace, patch_type=PatchType.MERGE)
        except ApiError as e:
            raise ActuatorError(f"scaling {name} to {replicas}: {e.status.message}") from e
        end = time.monotonic() + timeout_s
        while True:
            scale = await self.client.get(Deployment.Scale, name, namespace=self.namespace)
            have = int(scale.status.replicas or 0) if scale.status else 0
            if have == replicas:
                return
            if time.monotonic() >= end:
                raise ActuatorError(f"{name} has {have} replicas, not {replicas}, after "
                                    f"{timeout_s:.0f}s (pods pending?)")
            await asyncio.sleep(self.poll_s)

    async def drain(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        raise self._scale_only("drain")

    async def assign(self, instance_id: str, role: str, group: str, *, fence: int,
                     timeout_s: float) -> None:
        raise self._scale_only("assign")

    async def release(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        raise self._scale_only("release")

    @staticmethod
    def _scale_only(what: str) -> ActuatorError:
        return ActuatorError(f"Kubernetes pods are scaled, not switched: {what} is not "
                             "offered (plan_for makes SCALE steps for this actuator)",
                             retryable=False)
