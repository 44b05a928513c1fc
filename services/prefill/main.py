"""prefill: runs prompts and hands their KV off.

Lifecycle of the process: load the model on the model thread and warm it up (the event
loop keeps answering health meanwhile), attach the prefix KV cache, bind gRPC, follow
the registry (to find the group's kvstores), register in Redis as role "prefill" with
``slots`` (b_p) and heartbeat its load, then serve until SIGTERM. On SIGTERM it drains:
new requests are rejected as DRAINING (the gateway forwards them), health turns
NOT_SERVING and it deregisters, in-flight ones get ``grace_s`` to finish, then the model
thread stops.

Modules: ``servicer`` (admission, early intervention, compute, stats), ``handoff``
(reserve, push, ``kv_ready``, per-layer transfer, release), ``estimator`` (the lower
bound on prefill time and the reservation lease).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

from pdserve.v1 import prefill_service_pb2 as pb
from pdserve.v1 import prefill_service_pb2_grpc as pb_grpc
from services.cluster.registry import RegistryView
from services.common.config import ConfigError
from services.common.runtime import ServiceRuntime, run_main
from services.engine.worker import ModelThread, WorkerConfig, worker_info
from services.prefill.handoff import Handoff
from services.prefill.servicer import PrefillServicer

SERVICE = pb.DESCRIPTOR.services_by_name["PrefillService"].full_name


@dataclass(frozen=True)
class PrefillConfig(WorkerConfig):
    """A prefill worker: a model worker plus its prefix KV cache."""

    prefix_cache_mb: int = 256  # LRU cap of the prefix KV cache; 0 turns it off
    prefix_block_tokens: int = 64  # tokens per cached block (chained hashes)
    # Lease on the staged KV for the handoff after the compute; the reservation adds the
    # expected compute (reservation_lease_ms).
    kv_lease_s: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_lease_s <= 0:
            raise ConfigError(f"need kv_lease_s > 0, got {self.kv_lease_s}")
        if self.prefix_cache_mb < 0 or self.prefix_block_tokens <= 0:
            raise ConfigError(f"need prefix_cache_mb >= 0 and prefix_block_tokens > 0, got "
                              f"{self.prefix_cache_mb}, {self.prefix_block_tokens}")

    @staticmethod
    def of(cfg: WorkerConfig) -> PrefillConfig:
        """A plain worker config as a prefill config (prefix settings at their defaults)."""
        if isinstance(cfg, PrefillConfig):
            return cfg
        return PrefillConfig(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})


async def start(cfg: WorkerConfig) -> tuple[ServiceRuntime, PrefillServicer]:
    from services.engine.factory import load_runner

    cfg = PrefillConfig.of(cfg)
    runtime = ServiceRuntime(cfg, "prefill", [SERVICE])
    thread = ModelThread("prefill-model")
    # Load on the model thread: the event loop keeps serving health and heartbeats.
    runner = await thread.run(load_runner, cfg.model, cfg.cache_dir, cfg.torch_threads)
    await thread.run(runner.warmup)
    if cfg.prefix_cache_mb > 0:
        runner.attach_prefix_cache(cfg.prefix_cache_mb << 20, cfg.prefix_block_tokens)
    handoff = Handoff(cfg, runner, thread, cfg.kv_lease_s)
    servicer = PrefillServicer(cfg, runtime, runner, thread, handoff)
    await runtime.start(lambda s: pb_grpc.add_PrefillServiceServicer_to_server(servicer, s))
    handoff.view = RegistryView(runtime.redis)
    await handoff.view.start()
    try:
        await runtime.serving(worker_info(runtime, cfg, runner.fingerprint), servicer.load)
    except BaseException:  # refused (Redis credentials): stop what started
        await stop(runtime, servicer)
        raise
    servicer.offer_free_slots()  # requests may be waiting in the group's queue already
    return runtime, servicer


async def stop(runtime: ServiceRuntime, servicer: PrefillServicer) -> None:
    servicer.draining = True

    async def cleanup() -> None:
        if servicer.handoff.view is not None:
            await servicer.handoff.view.close()
        servicer.thread.shutdown()

    await runtime.stop(cleanup)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(PrefillConfig, "prefill", start, stop, argv)
