"""KubernetesActuator against a recording HTTP server that speaks the Kubernetes API
paths (no API server here): the requests it sends (paths, verbs, patch types, bodies),
fencing through the Deployment annotation, and its errors."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.control.actuator import (
    Actuator,
    ActuatorError,
    Capabilities,
    Decision,
    Kind,
    StaleFence,
    plan_for,
)
from services.control.actuators_k8s import FENCE_ANNOTATION, KubernetesActuator

pytestmark = pytest.mark.unit
NS = "serving"
BASE = f"/apis/apps/v1/namespaces/{NS}/deployments/"


class FakeApiServer:
    """Deployments and their Scale subresource; pods become ready at once (status.replicas
    follows spec.replicas) unless ``stuck`` names the deployment. Records every request."""

    def __init__(self) -> None:
        self.deployments: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, str, Any]] = []
        self.stuck: set[str] = set()
        self.auth: set[str] = set()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n)) if n else None
                path = self.path.split("?")[0]
                server.requests.append((self.command, path,
                                        self.headers.get("Content-Type", ""), body))
                server.auth.add(self.headers.get("Authorization", ""))
                if not path.startswith(BASE):
                    return self._reply(404, _status(404, "not found"))
                name, _, sub = path[len(BASE):].partition("/")
                dep = server.deployments.get(name)
                if dep is None:
                    return self._reply(404, _status(404, f'deployments "{name}" not found'))
                if self.command == "PATCH" and sub == "scale":
                    dep["spec"]["replicas"] = body["spec"]["replicas"]
                elif self.command == "PATCH":
                    rv = body.get("metadata", {}).get("resourceVersion")
                    if rv is not None and rv != dep["metadata"]["resourceVersion"]:
                        return self._reply(409, _status(409, "conflict"))
                    dep["metadata"].setdefault("annotations", {}).update(
                        body["metadata"].get("annotations", {}))
                    dep["metadata"]["resourceVersion"] = \
                        str(int(dep["metadata"]["resourceVersion"]) + 1)
                if name not in server.stuck:
                    dep["status"]["replicas"] = dep["spec"]["replicas"]
                if sub == "scale":
                    return self._reply(200, {
                        "apiVersion": "autoscaling/v1", "kind": "Scale",
                        "metadata": {"name": name, "namespace": NS},
                        "spec": {"replicas": dep["spec"]["replicas"]},
                        "status": {"replicas": dep["status"]["replicas"]}})
                return self._reply(200, dep)

            do_GET = do_PATCH = _handle

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def add(self, name: str, replicas: int) -> None:
        self.deployments[name] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": NS, "resourceVersion": "1"},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "w", "image": "pdserve"}]}}},
            "status": {"replicas": replicas}}

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _status(code: int, message: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Status", "status": "Failure", "message": message,
            "code": code, "reason": "NotFound" if code == 404 else "Conflict"}


@pytest.fixture()
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer()
    server.add("code-prefill", 2)
    server.add("code-decode", 3)
    yield server
    server.close()


@pytest.fixture()
async def act(api: FakeApiServer) -> Any:
    a = KubernetesActuator.for_server(api.url, namespace=NS, token="t0k", poll_s=0.01)
    yield a
    await a.close()


def test_it_is_a_scale_only_actuator() -> None:
    assert isinstance(KubernetesActuator.for_server("http://127.0.0.1:1"), Actuator)
    assert KubernetesActuator.capabilities == Capabilities(assign=False, scale=True)


async def test_scale_sends_a_merge_patch_to_the_scale_subresource(
        api: FakeApiServer, act: KubernetesActuator) -> None:
    assert await act.replicas("code", "decode") == 3
    api.requests.clear()
    await act.scale("code", "decode", 4, fence=7, timeout_s=5)
    verbs = [(m, p) for m, p, _, _ in api.requests]
    name = BASE + "code-decode"
    assert verbs[:3] == [("GET", name), ("PATCH", name), ("PATCH", name + "/scale")]
    assert verbs[3:] == [("GET", name + "/scale")]  # until status.replicas == 4
    _, _, ctype, body = api.requests[1]
    assert ctype == "application/merge-patch+json"
    assert body["metadata"]["annotations"] == {FENCE_ANNOTATION: "7"}
    assert body["metadata"]["resourceVersion"] == "1"
    _, _, ctype, body = api.requests[2]
    assert ctype == "application/merge-patch+json" and body == {"spec": {"replicas": 4}}
    assert api.deployments["code-decode"]["spec"]["replicas"] == 4
    assert await act.replicas("code", "decode") == 4
    assert api.auth == {"Bearer t0k"}


async def test_a_stale_fence_changes_nothing(api: FakeApiServer,
                                             act: KubernetesActuator) -> None:
    await act.scale("code", "prefill", 3, fence=9, timeout_s=5)
    api.requests.clear()
    with pytest.raises(StaleFence):
        await act.scale("code", "prefill", 1, fence=8, timeout_s=5)
    assert [m for m, _, _, _ in api.requests] == ["GET"]  # read, refused, nothing written
    assert api.deployments["code-prefill"]["spec"]["replicas"] == 3
    # the same token again is idempotent (no annotation write, same target)
    api.requests.clear()
    await act.scale("code", "prefill", 3, fence=9, timeout_s=5)
    assert [p.endswith("/scale") for m, p, _, _ in api.requests if m == "PATCH"] == [True]


async def test_errors_are_clear(api: FakeApiServer, act: KubernetesActuator) -> None:
    with pytest.raises(ActuatorError, match="no Deployment serving/chat-decode") as ei:
        await act.scale("chat", "decode", 1, fence=1, timeout_s=1)
    assert not ei.value.retryable
    assert await act.replicas("chat", "decode") == 0
    api.stuck.add("code-decode")
    with pytest.raises(ActuatorError, match="not 5") as ei:
        await act.scale("code", "decode", 5, fence=2, timeout_s=0.1)
    assert ei.value.retryable  # pods pending: the plan resumes next period
    with pytest.raises(ActuatorError, match="scaled, not switched"):
        await act.assign("x", "decode", "code", fence=3, timeout_s=1)


async def test_a_controller_plan_runs_as_absolute_scale_targets(
        api: FakeApiServer, act: KubernetesActuator) -> None:
    """SWITCH a prefill to decode in a fixed total: remove one, then add one."""
    d = Decision(Kind.SWITCH, "code", "decode", from_group="code", from_role="prefill")
    reps = {("code", "prefill"): await act.replicas("code", "prefill"),
            ("code", "decode"): await act.replicas("code", "decode")}
    plan = plan_for(d, 11, "p1", act.capabilities, reps)
    for step in plan.steps:
        await act.scale(step.group, step.role, step.replicas, fence=plan.fence, timeout_s=5)
    for step in plan.steps:  # a successor re-running the plan converges to the same
        await act.scale(step.group, step.role, step.replicas, fence=plan.fence, timeout_s=5)
    assert api.deployments["code-prefill"]["spec"]["replicas"] == 1
    assert api.deployments["code-decode"]["spec"]["replicas"] == 4
