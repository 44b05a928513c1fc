"""The lifecycle every pdserve service process shares.

  1. ``ServiceRuntime.start`` binds a grpc.aio server (port 0 allowed), adds the
     service's servicers, grpc.health.v1 (NOT_SERVING) and server reflection.
  2. The service warms up (loads its model), then calls ``serving``: health turns
     SERVING, the instance registers in Redis with a heartbeat lease, and the
     ready file (for ``pdserve up``) is written.
  3. ``run_service`` waits for SIGINT/SIGTERM, then ``stop``: health NOT_SERVING,
     deregister, ``server.stop(grace)`` for in-flight calls, service cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.cluster.registry import InstanceInfo, Registration, connect
from services.common import faultpoints
from services.common.auth import ClusterTokenInterceptor, token_interceptors
from services.common.config import ServiceConfig
from services.observe.metrics import (
    Labels,
    MetricsServer,
    Source,
    from_load,
    register_source,
    serve_metrics,
)

log = logging.getLogger(__name__)
C = TypeVar("C")
# Roles whose gRPC is internal: callers must present the cluster token when one is set.
# Processes that only the cluster calls (and operators holding its token: admin).
INTERNAL_ROLES = frozenset({"prefill", "decode", "kvstore", "worker", "admin"})
_cluster_token = ""  # this process's cluster token (set by ServiceRuntime)

# KV travels outside gRPC, so messages stay small; this bounds a malicious or buggy peer.
MAX_MESSAGE_BYTES = 64 << 20
# Our channels ping every 10 s while a call is open (CHANNEL_OPTIONS), and clients in
# other languages keep pinging on a silent stream. A server with gRPC's defaults accepts
# a ping only every 5 min while it sends no data and answers repeated early ones with
# GOAWAY "too_many_pings": a stream silent for ~25 s (a request waiting in the forwarding
# queue, a drain, a long prefill) ended UNAVAILABLE "Too many pings". Accept pings every
# 5 s, also between calls, which admits any client pinging at our rate or slower
# (tests/integration/test_keepalive.py).
SERVER_PING_MIN_MS = 5_000
SERVER_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.so_reuseport", 0),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # The recv variant alone is not enough: grpc-core's server also checks the second
    # (measured: GOAWAY at ~25 s with only the first set).
    ("grpc.http2.min_recv_ping_interval_without_data_ms", SERVER_PING_MIN_MS),
    ("grpc.http2.min_ping_interval_without_data_ms", SERVER_PING_MIN_MS),
    ("grpc.keepalive_permit_without_calls", 1),
)
CHANNEL_OPTIONS: Sequence[tuple[str, int]] = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )


@functools.cache
def host_id() -> str:
    """Stable identity of this machine (same-host transports compare it). Read once: the
    decode asks for it on every request."""
    try:
        return Path("/etc/machine-id").read_text().strip() or socket.gethostname()
    except OSError:
        return socket.gethostname()


class ServiceRuntime:
    def __init__(self, cfg: ServiceConfig, role: str, service_names: Sequence[str], *,
                 interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
                 credentials: grpc.ServerCredentials | None = None,
                 reflection: bool = True) -> None:
        """``interceptors`` run in order on every call (e.g. auth.ApiKeyInterceptor);
        ``credentials`` serve TLS instead of plaintext; ``reflection`` off hides the API."""
        self.cfg = cfg
        self.role = role
        self.instance_id = cfg.resolved_instance_id(role)
        if cfg.fault_delays:  # test-only (faultpoints.py)
            faultpoints.install(cfg.fault_delays)
        global _cluster_token
        _cluster_token = cfg.cluster_token  # sent on every call of new_channel()
        if cfg.cluster_token and role in INTERNAL_ROLES:
            interceptors = [ClusterTokenInterceptor(cfg.cluster_token), *interceptors]
        self.server = grpc.aio.server(options=SERVER_OPTIONS,
                                      interceptors=list(interceptors) or None)
        self._credentials = credentials
        self._reflection = reflection
        self.metrics_server: MetricsServer | None = None
        self.ready_extra: dict[str, str] = {}  # more fields for the ready file (e.g. http)
        self._unregister_metrics: list[Callable[[], None]] = []
        self.health = health.aio.HealthServicer()
        self._service_names = list(service_names)
        self.port = 0
        self.registration: Registration | None = None
        self._redis = connect(cfg.redis_url) if cfg.redis_url else None

    @property
    def address(self) -> str:
        return self.cfg.advertised(self.port)

    @property
    def metrics_url(self) -> str:
        if self.metrics_server is None:
            return ""
        return f"http://{self.cfg.advertised(self.metrics_server.port)}/metrics"

    def register_metrics(self, fn: Source) -> None:
        """Export ``fn()`` (names from metrics.SCRAPED) with this instance's labels."""
        self._unregister_metrics.append(
            register_source(Labels(self.role, self.cfg.group, self.instance_id), fn))

    @property
    def redis(self):  # type: ignore[no-untyped-def]
        if self._redis is None:
            raise RuntimeError("no redis_url configured")
        return self._redis

    async def start(self, add_servicers: Callable[[grpc.aio.Server], None]) -> int:
        add_servicers(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self._reflection:
            names = [*self._service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
            reflection.enable_server_reflection(names, self.server)
        bind = f"{self.cfg.host}:{self.cfg.port}"
        self.port = (self.server.add_secure_port(bind, self._credentials)
                     if self._credentials is not None else self.server.add_insecure_port(bind))
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.cfg.host}:{self.cfg.port}")
        await self.server.start()
        if self.cfg.metrics_port >= 0:
            self.metrics_server = serve_metrics(self.cfg.host, self.cfg.metrics_port)
            log.info("%s %s metrics on %s", self.role, self.instance_id, self.metrics_url)
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        log.info("%s %s listening on %s", self.role, self.instance_id, self.address)
        return self.port

    async def serving(
        self,
        info: InstanceInfo | None = None,
        load_fn: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        if load_fn is not None:  # its load record doubles as its metrics (metrics.from_load)
            fn = load_fn
            self.register_metrics(lambda: from_load(self.role, fn()))
        if info is not None and self._redis is not None:
            self.registration = Registration(
                self._redis, info, self.cfg.registry_ttl_s, self.cfg.heartbeat_s, load_fn
            )
            await self.registration.start()
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.cfg.ready_file:
            # A few bytes, once, at startup: not worth a thread hop.
            tmp = Path(self.cfg.ready_file + ".tmp")
            ready = json.dumps({"address": self.address, "pid": os.getpid(),
                                "instance_id": self.instance_id,
                                "metrics": self.metrics_url, **self.ready_extra})
            tmp.write_text(ready)  # noqa: ASYNC240
            tmp.rename(self.cfg.ready_file)  # noqa: ASYNC240
        log.info("%s %s SERVING", self.role, self.instance_id)

    async def stop(self, cleanup: Callable[[], Awaitable[None]] | None = None) -> None:
        for name in ["", *self._service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.registration is not None:
            await self.registration.close()
        await self.server.stop(self.cfg.grace_s)
        if cleanup is not None:
            await cleanup()
        for unregister in self._unregister_metrics:
            unregister()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self._redis is not None:
            await self._redis.aclose()
        log.info("%s %s stopped", self.role, self.instance_id)


async def wait_for_signal() -> None:
    """Return on the first SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def run_main(
    cfg_cls: type[C],
    role: str,
    start: Callable[[C], Awaitable[tuple[Any, ...]]],
    stop: Callable[..., Awaitable[None]],
    argv: Sequence[str] | None = None,
) -> None:
    """A service's ``main``: config, logging, telemetry, then serve until a signal."""
    from services.common.config import load_config
    from services.observe.telemetry import setup_telemetry

    cfg = load_config(cfg_cls, sys.argv[1:] if argv is None else argv, prog=f"pdserve-{role}")
    setup_logging(cfg.log_level)  # type: ignore[attr-defined]
    setup_telemetry(f"pdserve-{role}")

    async def serve() -> None:
        handles = await start(cfg)
        try:
            await wait_for_signal()
        finally:
            await stop(*handles)

    # uvloop (a dependency) runs grpc.aio, redis and the KV data channels on libuv: less CPU
    # per request than the default loop (bench/frontdoor.py).
    try:
        import uvloop
    except ImportError:  # pragma: no cover - it is a pinned dependency
        asyncio.run(serve())
    else:
        uvloop.run(serve())


def new_channel(address: str) -> grpc.aio.Channel:
    """A channel to a pdserve service; it carries the cluster token when one is set."""
    return grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS,
                                     interceptors=token_interceptors(_cluster_token) or None)
