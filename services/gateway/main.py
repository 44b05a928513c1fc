"""gateway: the public GenerationService and the scheduler in front of the workers.

Lifecycle of the process:
  1. Resolve the model (tokenizer, context length, EOS ids) without torch, bind
     gRPC (default port 50051), start a polled view of the Redis registry.
  2. Register as role "gateway", turn SERVING, route requests (see servicer.py).
  3. On SIGTERM: NOT_SERVING, deregister, let in-flight streams finish within
     the grace period, close downstream channels.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from pdserve.v1 import generation_service_pb2 as pb
from pdserve.v1 import generation_service_pb2_grpc as pb_grpc
from services.common.config import ConfigError, ModelConfig, ServiceConfig
from services.common.registry import InstanceInfo, RegistryView
from services.common.runtime import ServiceRuntime, host_id, run_main
from services.gateway.fwdqueue import ForwardingQueue
from services.gateway.scheduling import Policy
from services.gateway.servicer import GenerationServicer
from services.model.info import ModelInfo
from services.model.tokenizer import TextTokenizer

SERVICE = pb.DESCRIPTOR.services_by_name["GenerationService"].full_name


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.default_max_tokens <= 0:
            raise ConfigError("default_max_tokens must be > 0")
        if self.scheduler not in {p.value for p in Policy}:
            raise ConfigError(f"scheduler must be one of {[p.value for p in Policy]}, "
                              f"got {self.scheduler!r}")
        if self.unknown_scenario not in ("default", "refuse"):
            raise ConfigError("unknown_scenario must be 'default' or 'refuse'")
        if self.queue_poll_s <= 0 or self.max_queue_s <= 0:
            raise ConfigError("queue_poll_s and max_queue_s must be positive")


async def start(cfg: GatewayConfig) -> tuple[ServiceRuntime, GenerationServicer, RegistryView]:
    runtime = ServiceRuntime(cfg, "gateway", [SERVICE])
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
                                  refuse_unknown_scenario=cfg.unknown_scenario == "refuse")
    await runtime.start(lambda s: pb_grpc.add_GenerationServiceServicer_to_server(servicer, s))
    await runtime.serving(InstanceInfo(
        instance_id=runtime.instance_id, role="gateway", group=cfg.group,
        address=runtime.address, host_id=host_id(), started_unix=time.time()),
        lambda: {"open_streams": float(sum(servicer.open_streams.values())),
                 "rejections_total": float(servicer.admission.stats.rejections_total),
                 "forwarded_total": float(servicer.admission.stats.forwarded_total),
                 "queued_total": float(servicer.admission.stats.queued_total)})
    return runtime, servicer, view


async def stop(runtime: ServiceRuntime, servicer: GenerationServicer, view: RegistryView) -> None:
    async def cleanup() -> None:
        if servicer.admission.queue is not None:
            await servicer.admission.queue.close()
        await view.close()
        await servicer.close()

    await runtime.stop(cleanup)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(GatewayConfig, "gateway", start, stop, argv)
