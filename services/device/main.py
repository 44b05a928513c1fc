"""device: the emulated on-device assistant (P/D-Device), a process of its own.

Lifecycle of the process:
  1. Load the tokenizer. For each of the ``fleet_size`` emulated devices (fleet.py; one
     by default): its engine (torch model stretched by the speed factor k, or the
     profile mock at its own speed) on its own model thread, warmed up; its optimiser
     profiles (a profile file, or measure the device now).
  2. If a cloud is configured, each device starts its own WAN relay (RTT, bandwidth)
     toward the gateway and opens its own channel through it (TLS with
     ``cloud_tls_ca``, the API key with ``cloud_api_key``, as any client of the door).
  3. Bind gRPC (DeviceService, health, reflection), turn SERVING. A device is a client
     of the cloud: it does not register in Redis.
  4. On SIGTERM: NOT_SERVING, in-flight chats finish within the grace period, the relays
     and channels close, the model threads stop.
Lifecycle of a chat: validate -> pick the device (``device_index``) -> settings (its
optimiser, or the request's overrides) -> ``ChatRun`` (session.py) -> stream displayed
tokens (cut at a stop string) -> summary.
"""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc

from pdserve.v1 import device_service_pb2 as pb
from pdserve.v1 import device_service_pb2_grpc as pb_grpc
from services.common.config import ConfigError, ModelConfig, ServiceConfig
from services.common.errors import InvalidArgument, PdserveError, abort_with
from services.common.runtime import ServiceRuntime, run_main
from services.device.controller import ControllerConfig
from services.device.fleet import EmulatedDevice, build_device
from services.device.optimizer import Constraints
from services.device.session import ChatRun, RunSettings
from services.engine.sampling import Sampling
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
    cloud_tls_ca: str = ""  # PEM of the CA that signed the gateway's certificate; empty: plaintext
    cloud_api_key: str = ""  # sent as "Authorization: Bearer <key>" to a keyed gateway
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
    cloud_stall_s: float = 10.0  # no further cloud message by then: local prefill
    fleet_size: int = 1  # emulated devices in this process (> 1: the mock engine only)
    fleet_spread: float = 0.0  # device i is 1 + spread * i / (n - 1) times slower (and RTT)
    # Mock engine: the profile's times x time_scale. A bench on a shared host stretches all
    # modelled time (cloud, device, link, and the pacing figures it passes) by the same
    # factor, so the host's own scheduling stalls stay small against it.
    time_scale: float = 1.0
    pace_step_ms: float = 5.0  # speed controller: max change of the pace per token

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
        if self.fleet_size < 1 or self.fleet_spread < 0 or self.cloud_stall_s <= 0 \
                or self.time_scale <= 0 or self.pace_step_ms <= 0:
            raise ConfigError("need fleet_size >= 1, fleet_spread >= 0, cloud_stall_s > 0, "
                              "time_scale > 0, pace_step_ms > 0")
        if self.cloud_tls_ca and not Path(self.cloud_tls_ca).is_file():
            raise ConfigError(f"cloud_tls_ca: no such file {self.cloud_tls_ca!r}")
        if self.fleet_size > 1 and self.engine != "mock":
            raise ConfigError("fleet_size > 1 needs engine mock: torch devices in one "
                              "process would share this host's cores, which phones do not")


MAX_STOP_STRINGS = 8


class DeviceServicer(pb_grpc.DeviceServiceServicer):
    def __init__(self, cfg: DeviceConfig, info: ModelInfo, tok: TextTokenizer,
                 devices: list[EmulatedDevice]) -> None:
        self.cfg, self.info, self.tok, self.devices = cfg, info, tok, devices

    def _device(self, request: pb.ChatRequest) -> EmulatedDevice:
        if request.device_index >= len(self.devices):
            raise InvalidArgument(f"device_index must be in [0, {len(self.devices)}) "
                                  "(this process hosts --fleet-size devices)",
                                  reason="DEVICE_INDEX")
        return self.devices[request.device_index]

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

    def settings(self, request: pb.ChatRequest, n: int,
                 dev: EmulatedDevice | None = None) -> RunSettings:
        cfg = self.cfg
        dev = dev or self.devices[0]
        planner = dev.planner
        max_tokens = request.max_tokens if request.HasField("max_tokens") \
            else cfg.default_max_tokens
        if max_tokens < 1 or n + max_tokens > self.info.max_context:
            raise InvalidArgument(f"need max_tokens >= 1 and prompt ({n}) + max_tokens "
                                  f"<= context ({self.info.max_context})",
                                  reason="INVALID_MAX_TOKENS")
        if not 0.0 <= request.refine_ratio <= 1.0 or request.tau_ms < 0:
            raise InvalidArgument("need refine_ratio in [0, 1] and tau_ms >= 0",
                                  reason="INVALID_SETTINGS")
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if not 0.0 <= request.temperature <= 100.0 or not 0.0 < top_p <= 1.0:
            raise InvalidArgument("need temperature in [0, 100] and top_p in (0, 1]",
                                  reason="INVALID_SAMPLING")
        if len(request.stop) > MAX_STOP_STRINGS or any(not x for x in request.stop):
            raise InvalidArgument(f"stop takes up to {MAX_STOP_STRINGS} non-empty strings",
                                  reason="INVALID_STOP")
        mode = request.mode or MODES[cfg.mode]
        if mode != pb.DEVICE_MODE_DEVICE_ONLY and dev.stub is None:
            raise InvalidArgument("this device has no cloud configured (--cloud-address); "
                                  "use mode device_only", reason="NO_CLOUD")
        pace_max = max(cfg.tau_min_ms, (request.tpot_max_ms or cfg.tpot_max_ms)
                       - cfg.display_margin_ms)
        c = Constraints(ttft_target_ms=request.ttft_target_ms or cfg.ttft_target_ms,
                        tpot_max_ms=pace_max,
                        min_quality=request.min_quality or cfg.min_quality,
                        tau_min_ms=cfg.tau_min_ms, quality=planner.constraints.quality)
        plan = planner.plan(n, max_tokens, c)
        overridden = bool(request.token_budget or request.refine_ratio)
        if mode == pb.DEVICE_MODE_PD_DEVICE and plan.mode != "pd_device" and not overridden:
            log.info("optimiser: %s for %d tokens (%s)", plan.mode, n, plan.reason)
            mode = MODES[plan.mode]
        # The pace: the plan's for pd_device; the source's own TPOT for the baselines.
        own = planner.profiles.device_tpot_ms if mode == pb.DEVICE_MODE_DEVICE_ONLY \
            else planner.profiles.cloud_tpot_ms
        tau = request.tau_ms or (plan.tau_ms if mode == pb.DEVICE_MODE_PD_DEVICE and
                                 plan.mode == "pd_device" else own)
        tau = min(max(tau, cfg.tau_min_ms), c.tpot_max_ms)
        # device_only shows local tokens as they come (gain 0): nothing to smooth.
        # Whatever the mode, a cloud-served first token is held so the cloud's t1 -> t2
        # gap (its KV handoff) does not show as one long gap (optimizer.py, H).
        hold = 0.0 if mode == pb.DEVICE_MODE_DEVICE_ONLY else \
            planner.profiles.hold_ms(n, c.tpot_max_ms) if plan.mode == "device_only" \
            else plan.hold_ms
        ctl = ControllerConfig(tau_ms=tau, tau_min_ms=cfg.tau_min_ms,
                               tau_max_ms=max(tau, c.tpot_max_ms),
                               gain=0.0 if mode == pb.DEVICE_MODE_DEVICE_ONLY
                               else ControllerConfig.gain, first_hold_ms=hold,
                               step_ms=cfg.pace_step_ms)
        local = min(max(planner.profiles.device_tpot_ms, cfg.tau_min_ms), c.tpot_max_ms)
        budget = request.token_budget or (plan.n_budget if plan.mode == "pd_device"
                                          else max_tokens)
        return RunSettings(mode=mode, max_tokens=max_tokens, n_budget=min(budget, max_tokens),
                           rho=request.refine_ratio or plan.rho, tau_ms=tau,
                           chunk_tokens=cfg.chunk_tokens, cloud_timeout_s=cfg.cloud_timeout_s,
                           rtt_ms=dev.rtt_ms, controller=ctl, local_pace_ms=local,
                           sampling=Sampling(request.temperature, top_p,
                                             request.seed if request.HasField("seed")
                                             else None),
                           stop=tuple(request.stop), cloud_stall_s=cfg.cloud_stall_s)

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext
                   ) -> AsyncIterator[pb.ChatResponse]:
        rid = request.request_id or uuid.uuid4().hex
        try:
            ids = self._ids(request)
            dev = self._device(request)
            s = self.settings(request, len(ids), dev)
        except PdserveError as e:
            e.metadata.setdefault("request_id", rid)
            await abort_with(context, e)
            return
        run = ChatRun(dev.engine, dev.thread, dev.stub, ids, self.info.eos_token_ids, s,
                      rid, self.tok)
        detok = Detokenizer(self.tok, s.stop)
        run.start()
        sent = 0
        try:
            async for batch in run.display():
                text = ""
                for i, (t, _, _) in enumerate(batch):  # one by one: where a stop string ends
                    text += detok.add([t])
                    if detok.stopped:
                        batch = batch[:i + 1]
                        break
                sent += len(batch)
                yield pb.ChatResponse(
                    tokens=[pb.DisplayedToken(token_id=t, display_ms=ms, source=cast(Any, src))
                            for t, ms, src in batch], text=text, request_id=rid)
                if detok.stopped:
                    break
        finally:
            await run.close()
        del run.shown[sent:]  # what the user saw, not what the display had released
        summary = run.summary(s.mode)
        summary.device_index = dev.index
        planner = dev.planner
        if not summary.fallback:  # a failed cloud says nothing about its speed
            a = run.cloud_arrivals
            planner.observe(len(ids), a[0] if a else 0.0, run.cloud_tpot_ms(),
                            a[1] - a[0] if len(a) > 1 else 0.0)
        if run.catchup_tokens:  # a hand-off: how fast the catch-up prefill really ran
            planner.observe_device(run.catchup_tokens, run.catchup_chunks,
                                   run.catchup_wall_ms)
        yield pb.ChatResponse(text=detok.flush(), summary=summary, request_id=rid)


async def start(cfg: DeviceConfig) -> tuple[ServiceRuntime, DeviceServicer]:
    runtime = ServiceRuntime(cfg, "device", [SERVICE])
    info = ModelInfo.load(cfg.model, cfg.cache_dir)
    if cfg.engine == "mock":  # the modelled device model's context, the tokenizer's ids
        from services.device.engine import load_profile

        ctx = int(load_profile(cfg.device_profile).get("max_context", info.max_context))
        info = dataclasses.replace(info, max_context=ctx)
    tok = TextTokenizer(info.path)
    constraints = Constraints(ttft_target_ms=cfg.ttft_target_ms,
                              tpot_max_ms=cfg.tpot_max_ms - cfg.display_margin_ms,
                              min_quality=cfg.min_quality, tau_min_ms=cfg.tau_min_ms)
    devices = [await build_device(cfg, info, i, constraints) for i in range(cfg.fleet_size)]
    if cfg.fleet_size > 1:
        log.info("fleet of %d devices (speed x%.2f .. x%.2f)", cfg.fleet_size,
                 devices[0].speed, devices[-1].speed)
    servicer = DeviceServicer(cfg, info, tok, devices)
    await runtime.start(lambda s: pb_grpc.add_DeviceServiceServicer_to_server(servicer, s))
    await runtime.serving()
    return runtime, servicer


async def stop(runtime: ServiceRuntime, servicer: DeviceServicer) -> None:
    async def cleanup() -> None:
        for dev in servicer.devices:
            await dev.close()

    await runtime.stop(cleanup)


def main(argv: Sequence[str] | None = None) -> None:
    run_main(DeviceConfig, "device", start, stop, argv)
