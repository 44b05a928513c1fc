"""device: the emulated on-device assistant (P/D-Device), a process of its own.

Lifecycle of the process:
  1. Load the tokenizer and the device engine (torch model stretched by the speed
     factor k, or the profile mock) on its model thread; warm it up; build the
     optimiser's profiles (a profile file, or measure the device now).
  2. If a cloud is configured, start the WAN relay (RTT, bandwidth) toward the
     gateway and open one channel through it.
  3. Bind gRPC (DeviceService, health, reflection), turn SERVING. A device is a client
     of the cloud: it does not register in Redis.
  4. On SIGTERM: NOT_SERVING, in-flight chats finish within the grace period, the relay
     and channel close, the model thread stops.
Lifecycle of a chat: validate -> settings (optimiser, or the request's overrides) ->
``ChatRun`` (session.py) -> stream displayed tokens -> summary.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from pdserve.v1 import device_service_pb2 as pb
from pdserve.v1 import device_service_pb2_grpc as pb_grpc
from services.common.config import ConfigError, ModelConfig, ServiceConfig
from services.common.errors import InvalidArgument, PdserveError, abort_with
from services.common.runtime import ServiceRuntime, new_channel, run_main
from services.device.controller import ControllerConfig
from services.device.optimizer import Constraints
from services.device.planning import Planner, load_plan_profile, measure_device
from services.device.session import ChatRun, RunSettings, default_stub_factory
from services.device.wan import WanRelay
from services.engine.worker import ModelThread
from services.model.info import ModelInfo
from services.model.tokenizer import Detokenizer, TextTokenizer

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["DeviceService"].full_name
MODES = {"pd_device": pb.DEVICE_MODE_PD_DEVICE, "cloud_only": pb.DEVICE_MODE_CLOUD_ONLY,
         "device_only": pb.DEVICE_MODE_DEVICE_ONLY}


@dataclass(frozen=True)
class DeviceConfig(ServiceConfig, ModelConfig):
    """Settings of the emulated device."""

    cloud_address: str = ""  # the pdserve gateway (host:port); empty: device_only
    mode: str = "pd_device"  # default mode: pd_device | cloud_only | device_only
    engine: str = "torch"  # torch: the real model, stretched; mock: a latency profile
    speed_factor: float = 1.0  # k: the device is k times slower than this host (torch)
    device_profile: str = "phone"  # mock engine latency profile (profiles/*.json or path)
    plan_profile: str = ""  # optimiser profile JSON (pdserve device profile); empty: measure
    wan_rtt_ms: float = 0.0  # emulated device<->cloud round trip (0: no relay)
    wan_bandwidth_mbps: float = 0.0  # emulated link rate (0: unlimited)
    chunk_tokens: int = 128  # catch-up prefill chunk
    default_max_tokens: int = 128
    ttft_target_ms: float = 1500.0
    tpot_max_ms: float = 50.0
    # The pace is planned this far below tpot_max_ms: a display wakes up late by the event
    # loop's jitter (1-5 ms here on 2 busy cores), and the bound is on measured gaps.
    display_margin_ms: float = 5.0
    min_quality: float = 0.0
    tau_min_ms: float = 10.0
    cloud_timeout_s: float = 5.0  # no first cloud token by then: local prefill

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {sorted(MODES)}, got {self.mode!r}")
        if self.engine not in ("torch", "mock"):
            raise ConfigError(f"engine must be torch or mock, got {self.engine!r}")
        if self.speed_factor < 1.0 or self.chunk_tokens < 1 or self.cloud_timeout_s <= 0:
            raise ConfigError("need speed_factor >= 1, chunk_tokens >= 1, cloud_timeout_s > 0")
        if not 0 < self.tau_min_ms <= self.tpot_max_ms - self.display_margin_ms:
            raise ConfigError("need 0 < tau_min_ms <= tpot_max_ms - display_margin_ms")
        if self.display_margin_ms < 0:
            raise ConfigError("need display_margin_ms >= 0")


class DeviceServicer(pb_grpc.DeviceServiceServicer):
    def __init__(self, cfg: DeviceConfig, info: ModelInfo, tok: TextTokenizer, engine: Any,
                 thread: ModelThread, planner: Planner, stub: Any) -> None:
        self.cfg, self.info, self.tok, self.engine = cfg, info, tok, engine
        self.thread, self.planner, self.stub = thread, planner, stub

    def _ids(self, request: pb.ChatRequest) -> list[int]:
        if bool(request.prompt) == bool(request.prompt_token_ids):
            raise InvalidArgument("set exactly one of prompt and prompt_token_ids",
                                  reason="PROMPT_REQUIRED")
        if request.prompt:
            return self.tok.encode_chat(request.prompt) if request.use_chat_template \
                else self.tok.encode(request.prompt)
        ids = list(request.prompt_token_ids)
        if min(ids) < 0 or max(ids) >= self.info.vocab_size:
            raise InvalidArgument(f"token ids must be in [0, {self.info.vocab_size})",
                                  reason="TOKEN_OUT_OF_VOCAB")
        return ids

    def settings(self, request: pb.ChatRequest, n: int) -> RunSettings:
        cfg = self.cfg
        max_tokens = request.max_tokens if request.HasField("max_tokens") \
            else cfg.default_max_tokens
        if max_tokens < 1 or n + max_tokens > self.info.max_context:
            raise InvalidArgument(f"need max_tokens >= 1 and prompt ({n}) + max_tokens "
                                  f"<= context ({self.info.max_context})",
                                  reason="INVALID_MAX_TOKENS")
        if not 0.0 <= request.refine_ratio <= 1.0 or request.tau_ms < 0:
            raise InvalidArgument("need refine_ratio in [0, 1] and tau_ms >= 0",
                                  reason="INVALID_SETTINGS")
        mode = request.mode or MODES[cfg.mode]
        if mode != pb.DEVICE_MODE_DEVICE_ONLY and self.stub is None:
            raise InvalidArgument("this device has no cloud configured (--cloud-address); "
                                  "use mode device_only", reason="NO_CLOUD")
        pace_max = max(cfg.tau_min_ms, (request.tpot_max_ms or cfg.tpot_max_ms)
                       - cfg.display_margin_ms)
        c = Constraints(ttft_target_ms=request.ttft_target_ms or cfg.ttft_target_ms,
                        tpot_max_ms=pace_max,
                        min_quality=request.min_quality or cfg.min_quality,
                        tau_min_ms=cfg.tau_min_ms, quality=self.planner.constraints.quality)
        plan = self.planner.plan(n, max_tokens, c)
        overridden = bool(request.token_budget or request.refine_ratio)
        if mode == pb.DEVICE_MODE_PD_DEVICE and plan.mode != "pd_device" and not overridden:
            log.info("optimiser: %s for %d tokens (%s)", plan.mode, n, plan.reason)
            mode = MODES[plan.mode]
        # The pace: the plan's for pd_device; the source's own TPOT for the baselines.
        own = self.planner.profiles.device_tpot_ms if mode == pb.DEVICE_MODE_DEVICE_ONLY \
            else self.planner.profiles.cloud_tpot_ms
        tau = request.tau_ms or (plan.tau_ms if mode == pb.DEVICE_MODE_PD_DEVICE and
                                 plan.mode == "pd_device" else own)
        tau = min(max(tau, cfg.tau_min_ms), c.tpot_max_ms)
        # device_only shows local tokens as they come (gain 0): nothing to smooth.
        ctl = ControllerConfig(tau_ms=tau, tau_min_ms=cfg.tau_min_ms,
                               tau_max_ms=max(tau, c.tpot_max_ms),
                               gain=0.0 if mode == pb.DEVICE_MODE_DEVICE_ONLY
                               else ControllerConfig.gain)
        local = min(max(self.planner.profiles.device_tpot_ms, cfg.tau_min_ms), c.tpot_max_ms)
        budget = request.token_budget or (plan.n_budget if plan.mode == "pd_device"
                                          else max_tokens)
        return RunSettings(mode=mode, max_tokens=max_tokens, n_budget=min(budget, max_tokens),
                           rho=request.refine_ratio or plan.rho, tau_ms=tau,
                           chunk_tokens=cfg.chunk_tokens, cloud_timeout_s=cfg.cloud_timeout_s,
                           rtt_ms=cfg.wan_rtt_ms, controller=ctl, local_pace_ms=local)

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[pb.ChatResponse]:
        rid = request.request_id or uuid.uuid4().hex
        try:
            ids = self._ids(request)
            s = self.settings(request, len(ids))
        except PdserveError as e:
            e.metadata.setdefault("request_id", rid)
            await abort_with(context, e)
            return
        run = ChatRun(self.engine, self.thread, self.stub, ids, self.info.eos_token_ids, s,
                      rid)
        detok = Detokenizer(self.tok)
        run.start()
        try:
            async for batch in run.display():
                yield pb.ChatResponse(
                    tokens=[pb.DisplayedToken(token_id=t, display_ms=ms, source=src)
                            for t, ms, src in batch],
                    text=detok.add([t for t, _, _ in batch]), request_id=rid)
        finally:
            await run.close()
        summary = run.summary(s.mode)
        if not summary.fallback:  # a failed cloud says nothing about its speed
            first = run.cloud_arrivals[0] if run.cloud_arrivals else 0.0
            self.planner.observe(len(ids), first, run.cloud_tpot_ms())
        if run.catchup_tokens:  # a hand-off: how fast the catch-up prefill really ran
            self.planner.observe_device(run.catchup_tokens, run.catchup_chunks,
                                        run.catchup_wall_ms)
        yield pb.ChatResponse(text=detok.flush(), summary=summary, request_id=rid)


def _engine(cfg: DeviceConfig, info: ModelInfo) -> Any:
    if cfg.engine == "mock":
        from services.device.engine import MockDevice

        return MockDevice(cfg.device_profile, info.vocab_size)
    from services.device.engine import TorchDevice

    return TorchDevice(cfg.model, cfg.cache_dir, cfg.torch_threads, cfg.speed_factor)


def _device_curve(cfg: DeviceConfig, engine: Any) -> dict[str, Any]:
    if cfg.engine == "mock":
        sizes = (0, 256, 512, 1024, 2048, 4096, 8192, 16384)
        return {"prefill": [[n, engine.prefill_ms(0, n)] for n in sizes],
                "tpot_ms": engine.tpot, "chunk_overhead_ms": engine.a}
    return measure_device(engine)


async def start(cfg: DeviceConfig) -> tuple[ServiceRuntime, DeviceServicer, WanRelay | None,
                                             grpc.aio.Channel | None]:
    runtime = ServiceRuntime(cfg, "device", [SERVICE])
    info = ModelInfo.load(cfg.model, cfg.cache_dir)
    if cfg.engine == "mock":  # the modelled device model's context, the tokenizer's ids
        from services.device.engine import load_profile

        ctx = int(load_profile(cfg.device_profile).get("max_context", info.max_context))
        info = dataclasses.replace(info, max_context=ctx)
    tok = TextTokenizer(info.path)
    thread = ModelThread("device-model")
    engine = await thread.run(_engine, cfg, info)
    await thread.run(engine.warmup)
    profile = load_plan_profile(cfg.plan_profile) if cfg.plan_profile else \
        {"device": await thread.run(_device_curve, cfg, engine)}
    constraints = Constraints(ttft_target_ms=cfg.ttft_target_ms,
                              tpot_max_ms=cfg.tpot_max_ms - cfg.display_margin_ms,
                              min_quality=cfg.min_quality, tau_min_ms=cfg.tau_min_ms)
    planner = Planner(profile, cfg.wan_rtt_ms, cfg.wan_bandwidth_mbps, cfg.chunk_tokens,
                      constraints)
    relay = channel = stub = None
    if cfg.cloud_address:
        target = cfg.cloud_address
        if cfg.wan_rtt_ms or cfg.wan_bandwidth_mbps:
            relay = WanRelay(cfg.cloud_address, cfg.wan_rtt_ms, cfg.wan_bandwidth_mbps)
            target = await relay.start()
            log.info("WAN relay %s -> %s (rtt %g ms, %g Mbit/s)", target, cfg.cloud_address,
                     cfg.wan_rtt_ms, cfg.wan_bandwidth_mbps)
        channel = new_channel(target)
        stub = default_stub_factory(channel)
    servicer = DeviceServicer(cfg, info, tok, engine, thread, planner, stub)
    await runtime.start(lambda s: pb_grpc.add_DeviceServiceServicer_to_server(servicer, s))
    await runtime.serving()
    return runtime, servicer, relay, channel


async def stop(runtime: ServiceRuntime, servicer: DeviceServicer, relay: WanRelay | None,
               channel: grpc.aio.Channel | None) -> None:
    async def cleanup() -> None:
        if channel is not None:
            await channel.close()
        if relay is not None:
            await relay.close()
        servicer.thread.shutdown()

    await runtime.stop(cleanup)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(DeviceConfig, "device", start, stop, argv)
