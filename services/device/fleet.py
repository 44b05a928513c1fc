"""The emulated devices one device process hosts: one phone, or a fleet of them.

Each ``EmulatedDevice`` is one phone and shares nothing with the others:
  - its engine (its speed: device i of n runs the profile times
    ``1 + spread * i / (n - 1)``, so a fleet is not n copies of one phone),
  - its model thread (its compute: one phone's prefill never queues behind another's),
  - its WAN relay and gRPC channel (its link: its bytes never queue behind another
    phone's; the relay's RTT is scaled like its speed),
  - its planner (what it has learned about its own speed and the cloud's).
Why one process for many phones rather than a process per phone: a fleet device is the
profile mock, which sleeps instead of computing, so n of them cost one event loop and n
idle threads. n processes would add n interpreters (~100 MB each) and n event loops
contending for this host's cores, whose scheduling jitter a real phone does not have.
A torch device really computes on this host's cores, so torch devices are not pooled:
a fleet of them would share compute, which phones do not (``fleet_size`` > 1 needs the
mock engine).
Chats on one device still run one model call at a time on its thread (a phone serves
its user's chats in turn).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.auth import gateway_channel
from services.common.runtime import CHANNEL_OPTIONS
from services.device.optimizer import Constraints
from services.device.planning import Planner, load_plan_profile, measure_device
from services.device.session import default_stub_factory
from services.device.wan import WanRelay
from services.engine.worker import ModelThread
from services.model.info import ModelInfo

log = logging.getLogger(__name__)


@dataclass
class EmulatedDevice:
    index: int
    speed: float  # profile time multiplier (1: the profile's phone)
    rtt_ms: float
    engine: Any
    thread: ModelThread
    planner: Planner
    stub: Any = None
    relay: WanRelay | None = None
    channel: grpc.aio.Channel | None = None

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
        if self.relay is not None:
            await self.relay.close()
        self.thread.shutdown()


def speed_of(index: int, size: int, spread: float) -> float:
    return 1.0 + spread * index / (size - 1) if size > 1 else 1.0


def scale_profile(profile: dict[str, Any], speed: float) -> dict[str, Any]:
    """An optimiser profile for a device ``speed`` times slower than the profiled one
    (its RTT scaled alike); the cloud part is the same cloud."""
    out = copy.deepcopy(profile)
    dev = out["device"]
    dev["prefill"] = [[n, ms * speed] for n, ms in dev["prefill"]]
    dev["tpot_ms"] = float(dev["tpot_ms"]) * speed
    if "chunk_overhead_ms" in dev:
        dev["chunk_overhead_ms"] = float(dev["chunk_overhead_ms"]) * speed
    if "rtt_ms" in out:
        out["rtt_ms"] = float(out["rtt_ms"]) * speed
    return out


def _engine(cfg: Any, info: ModelInfo, speed: float) -> Any:
    if cfg.engine == "mock":
        from services.device.engine import MockDevice

        return MockDevice(cfg.device_profile, info.vocab_size, speed * cfg.time_scale)
    from services.device.engine import TorchDevice

    return TorchDevice(cfg.model, cfg.cache_dir, cfg.torch_threads, cfg.speed_factor)


def _device_curve(cfg: Any, engine: Any) -> dict[str, Any]:
    if cfg.engine == "mock":
        sizes = (0, 256, 512, 1024, 2048, 4096, 8192, 16384)
        return {"prefill": [[n, engine.prefill_ms(0, n)] for n in sizes],
                "tpot_ms": engine.tpot, "chunk_overhead_ms": engine.a}
    return measure_device(engine)


def _host(address: str) -> str:
    """The host of ``host:port`` (brackets of an IPv6 literal removed)."""
    return address.rpartition(":")[0].strip("[]") or address


async def build_device(cfg: Any, info: ModelInfo, index: int,
                       constraints: Constraints) -> EmulatedDevice:
    """Device ``index`` of ``cfg.fleet_size``: engine warmed up, planner, link to the cloud."""
    speed = speed_of(index, cfg.fleet_size, cfg.fleet_spread)
    rtt = cfg.wan_rtt_ms * speed
    thread = ModelThread(f"device-{index}")
    engine = await thread.run(_engine, cfg, info, speed)
    await thread.run(engine.warmup)
    if cfg.plan_profile:
        profile = scale_profile(load_plan_profile(cfg.plan_profile), speed)
    else:
        profile = {"device": await thread.run(_device_curve, cfg, engine)}
    planner = Planner(profile, rtt, cfg.wan_bandwidth_mbps, cfg.chunk_tokens, constraints)
    dev = EmulatedDevice(index, speed, rtt, engine, thread, planner)
    if cfg.cloud_address:
        target = cfg.cloud_address
        if rtt or cfg.wan_bandwidth_mbps:
            dev.relay = WanRelay(cfg.cloud_address, rtt, cfg.wan_bandwidth_mbps)
            target = await dev.relay.start()
            if index == 0 or cfg.fleet_size <= 4:
                log.info("device %d: WAN relay %s -> %s (rtt %g ms, %g Mbit/s)", index,
                         target, cfg.cloud_address, rtt, cfg.wan_bandwidth_mbps)
        # Through the relay the device dials 127.0.0.1:port; TLS still checks the gateway's
        # own name, so the certificate is the one the real phone would see.
        dev.channel = gateway_channel(
            target, cfg.cloud_tls_ca, cfg.cloud_api_key,
            tls_server_name=_host(cfg.cloud_address) if target != cfg.cloud_address else "",
            options=CHANNEL_OPTIONS)
        dev.stub = default_stub_factory(dev.channel)
    return dev
