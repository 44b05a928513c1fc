"""gateway: the public GenerationService and the scheduler in front of the workers.

Lifecycle of the process:
  1. Resolve the model (tokenizer, context length, EOS ids) without torch, bind
     gRPC (default port 50051; TLS and an API key if configured), start a polled view
     of the Redis registry, bind the OpenAI-compatible HTTP door (default port 8000,
     http.py) and /metrics.
  2. Register as role "gateway", turn SERVING, route requests (see servicer.py).
  3. On SIGTERM: NOT_SERVING, deregister, let in-flight streams finish within
     the grace period, close downstream channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.v1 import generation_service_pb2 as pb
from pdserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.cluster.registry import InstanceInfo, RegistryView
from services.common.auth import ApiKeyInterceptor, parse_keys, server_credentials
from services.common.config import ConfigError, ModelConfig, ServiceConfig
from services.common.runtime import ServiceRuntime, host_id, run_main
from services.common.tasks import cancel_and_wait
from services.gateway.fwdqueue import ForwardingQueue
from services.gateway.http import HttpDoor
from services.gateway.scheduling import Policy
from services.gateway.servicer import GenerationServicer
from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer
from services.observe.metrics import PREFIX, Labels, RequestMetrics

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GatewayConfig(ServiceConfig, ModelConfig):
    """Gateway settings."""

    port: int = 50051
    default_max_tokens: int = 256  # when a request leaves max_tokens unset
    registry_poll_s: float = 0.5  # how often the routing table is refreshed from Redis
    scheduler: str = "forward"  # forward | rr-queue | los-queue | reported-queue
    queue_poll_s: float = 1.0  # forwarding-queue safety-net poll (freed slots are offered)
    max_queue_s: float = 60.0  # longest wait in the forwarding queue without a TTFT deadline
    unknown_scenario: str = "default"  # a scenario with no group: "default" routes, "refuse"
    # OpenAI-compatible HTTP (/v1/chat/completions, ...) on the gateway's host; 0 picks a
    # free port, -1 turns it off
    http_port: int = 8000
    tls_cert: str = ""  # PEM certificate file: serve gRPC and HTTP over TLS (needs tls_key)
    tls_key: str = ""  # PEM private key file of tls_cert
    tls_client_ca: str = ""  # PEM CA file: also require client certificates it signed (mTLS)
    # require "Authorization: Bearer <key>" on gRPC (metadata) and HTTP; several keys
    # comma-separated; empty: no key needed (health and /metrics stay open)
    api_key: str = ""
    reflection: bool = True  # gRPC server reflection (grpcurl list); off hides the API
    # > 0: run the P/D ratio controller every this many seconds (docs/control-plane.md); one gateway
    # replica leads (a Redis lease), it acts on role-switchable workers (pdserve up
    # --switchable), every replica feeds it per-group request stats
    control_period_s: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not -1 <= self.http_port < 65536:
            raise ConfigError(f"http_port must be in [-1, 65535], got {self.http_port}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("tls_cert and tls_key go together: set both or neither")
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS)")
        if self.default_max_tokens <= 0:
            raise ConfigError("default_max_tokens must be > 0")
        if self.scheduler not in {p.value for p in Policy}:
            raise ConfigError(f"scheduler must be one of {[p.value for p in Policy]}, "
                              f"got {self.scheduler!r}")
        if self.unknown_scenario not in ("default", "refuse"):
            raise ConfigError("unknown_scenario must be 'default' or 'refuse'")
        if self.queue_poll_s <= 0 or self.max_queue_s <= 0:
            raise ConfigError("queue_poll_s and max_queue_s must be positive")


class GatewayRuntime(ServiceRuntime):
    """The gateway's runtime also holds its HTTP door and the queue-depth poller."""

    http: HttpDoor | None = None
    queue_depths: dict[str, float]
    poller: asyncio.Task[None] | None = None


async def _poll_queue_depths(runtime: GatewayRuntime, view: RegistryView,
                             queue: ForwardingQueue, period_s: float) -> None:
    """The forward_queue_depth gauge: Redis is asked here, not in the scrape thread."""
    while True:
        with contextlib.suppress(Exception):
            groups = {i.group for i in view.instances(role="prefill")}
            runtime.queue_depths = {g: float(await queue.depth(g)) for g in sorted(groups)}
        await asyncio.sleep(period_s)


async def start(cfg: GatewayConfig) -> tuple[ServiceRuntime, GenerationServicer, RegistryView]:
    keys = parse_keys(cfg.api_key)
    runtime = GatewayRuntime(
        cfg, "gateway", [SERVICE], interceptors=[ApiKeyInterceptor(keys)] if keys else [],
        credentials=server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        if cfg.tls_cert else None, reflection=cfg.reflection)
    runtime.queue_depths = {}
    info = ModelInfo.load(cfg.model, cfg.cache_dir)
    tokenizer = TextTokenizer(info.path)
    view = RegistryView(runtime.redis, cfg.registry_poll_s)
    await view.start()
    policy = Policy(cfg.scheduler)
    queue = None
    if policy.rejects:
        queue = ForwardingQueue(
            runtime.redis, runtime.instance_id, cfg.queue_poll_s,
            lambda: {i.instance_id for i in view.instances(role="gateway")})
        await queue.start()
    servicer = GenerationServicer(info, tokenizer, view, cfg.group, cfg.default_max_tokens,
                                  policy, queue, cfg.max_queue_s,
                                  refuse_unknown_scenario=cfg.unknown_scenario == "refuse",
                                  metrics=RequestMetrics(Labels("gateway", cfg.group,
                                                                runtime.instance_id)))
    servicer.instance_id = runtime.instance_id
    await runtime.start(lambda s: pb_grpc.add_GenerationServiceServicer_to_server(servicer, s))
    if cfg.http_port >= 0:
        runtime.http = HttpDoor(servicer, keys)
        port = await runtime.http.start(cfg.host, cfg.http_port, tls_cert=cfg.tls_cert,
                                        tls_key=cfg.tls_key, tls_client_ca=cfg.tls_client_ca,
                                        grace_s=cfg.grace_s)
        scheme = "https" if cfg.tls_cert else "http"
        runtime.ready_extra["http"] = f"{scheme}://{cfg.advertised(port)}"
        log.info("gateway OpenAI-compatible HTTP on %s/v1", runtime.ready_extra["http"])
    if queue is not None:
        runtime.poller = asyncio.get_running_loop().create_task(
            _poll_queue_depths(runtime, view, queue, max(cfg.registry_poll_s, 0.5)))
    runtime.register_metrics(lambda: {
        PREFIX + "open_streams": float(sum(servicer.open_streams.values())),
        PREFIX + "forward_queue_depth": dict(runtime.queue_depths)})  # per group
    try:
        await runtime.serving(InstanceInfo(
            instance_id=runtime.instance_id, role="gateway", group=cfg.group,
            address=runtime.address, host_id=host_id(), started_unix=time.time()),
            lambda: {"open_streams": float(sum(servicer.open_streams.values())),
                     "rejections_total": float(servicer.admission.stats.rejections_total),
                     "forwarded_total": float(servicer.admission.stats.forwarded_total),
                     "queued_total": float(servicer.admission.stats.queued_total)})
    except BaseException:  # refused (Redis credentials): stop what started
        await stop(runtime, servicer, view)
        raise
    if cfg.control_period_s > 0:
        from services.control.actuators_local import WorkerActuator
        from services.control.leader import LeaderElector
        from services.control.loop import ControlLoop

        servicer.control = ControlLoop(
            runtime.redis, LeaderElector(runtime.redis, runtime.instance_id),
            WorkerActuator(runtime.redis), period_s=cfg.control_period_s)
        await servicer.control.start()
    return runtime, servicer, view


async def stop(runtime: ServiceRuntime, servicer: GenerationServicer, view: RegistryView) -> None:
    assert isinstance(runtime, GatewayRuntime)
    # The HTTP door drains alongside gRPC's grace period.
    door = asyncio.get_running_loop().create_task(
        runtime.http.stop() if runtime.http is not None else asyncio.sleep(0))
    # Awaited, with the cancel repeated: a cancel that lands as redis-py's write fails
    # (the client closing) is swallowed on Python 3.11, and a poller left running kept
    # polling a closed client and hung the event loop's final cancel-all.
    await cancel_and_wait(runtime.poller)

    async def cleanup() -> None:
        await door
        if servicer.control is not None:
            await servicer.control.close()
        if servicer.admission.queue is not None:
            await servicer.admission.queue.close()
        await view.close()
        await servicer.close()

    await runtime.stop(cleanup)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(GatewayConfig, "gateway", start, stop, argv)
