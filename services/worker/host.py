"""One worker process that can serve prefill or decode, and switch between them.

``RoleHost`` owns what outlives a role: the loaded runner (weights), the paged KV pool
and the prefix cache once attached, the one step thread that runs torch for either
role, the registry view and the process's registration. A role is a servicer built
over those (``PrefillServicer`` or ``DecodeServicer``, the same classes the per-role
processes run); a switch builds a new one and keeps the rest.

States: STARTING -> IDLE (registry role "idle") or SERVING (role "prefill"/"decode").
A switch (SGLang PR 28403's rule: drain to idle first, since in-flight KV belongs to
the request's path) is:
  1. DRAINING: re-register as "draining" so gateways stop routing here (within their
     registry poll); requests that still arrive from a stale view are turned away the
     way each role turns away load it cannot take (prefill: rejected DRAINING, which
     the gateway forwards; decode: RESOURCE_EXHAUSTED, the gateway tries another
     decode), so none is lost.
  2. In-flight calls finish. After ``timeout_s`` those left end with ABORTED
     ``INSTANCE_DRAINED`` (a clear status; P/D-Serve does not migrate requests), and
     their KV (kvstore reservation, pool blocks) is released by the servicers' own
     cancel paths.
  3. DRAINED; then ``assign`` loads what the new role needs (the weights only if the
     model changed, the pool only if its size changed) and registers the new role.

Fencing: every control call carries the caller's fencing token; a token lower than
the highest seen is refused (STALE_FENCE), 0 is a manual (unfenced) call.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2

from pdserve.v1 import admin_service_pb2 as apb
from pdserve.v1 import decode_service_pb2 as dpb
from pdserve.v1 import prefill_service_pb2 as ppb
from services.cluster.registry import InstanceInfo, Registration, RegistryView
from services.common.config import ENV_PREFIX, ConfigError, as_env, load_config
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.runtime import ServiceRuntime
from services.decode.main import SERVICE as DECODE_SERVICE
from services.decode.main import DecodeConfig, DecodeServicer
from services.decode.steploop import StepLoop
from services.engine.worker import ModelThread, WorkerConfig, worker_info
from services.prefill.handoff import Handoff
from services.prefill.main import SERVICE as PREFILL_SERVICE
from services.prefill.main import PrefillConfig
from services.prefill.servicer import PrefillServicer

if TYPE_CHECKING:
    from collections.abc import Callable

    from services.engine.base import Runner
    from services.engine.paged import BlockAllocator

log = logging.getLogger(__name__)
T = TypeVar("T")
IDLE = "idle"  # registry role of a worker that serves no role (the spare pool)
# Registry role while leaving a role (draining, drained, loading the next): neither
# routable (gateways pick "prefill"/"decode") nor a spare (the controller picks "idle").
DRAINING = "draining"
STUCK_SEND_S = 5.0  # after a drain's abort, a call still in a send this long is cancelled
ROLES = ("prefill", "decode")
_WORKER_SLOTS_DEFAULT = WorkerConfig.__dataclass_fields__["slots"].default


@dataclass(frozen=True)
class HostConfig(DecodeConfig, PrefillConfig):
    """A role-switchable worker: the settings of both roles, and the role it starts in.
    ``slots`` is b_d when it serves decode; ``prefill_slots`` is b_p."""

    role: str = IDLE  # the role at start: idle (spare pool), prefill or decode
    prefill_slots: int = 0  # b_p when serving prefill; 0: the prefill default
    preload: bool = True  # an idle worker loads the weights at start (a fast spare)
    drain_timeout_s: float = 60.0  # in-flight work left after this ends with ABORTED

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.role not in (IDLE, *ROLES):
            raise ConfigError(f"role must be idle, prefill or decode, got {self.role!r}")
        if self.prefill_slots < 0 or self.drain_timeout_s <= 0:
            raise ConfigError("need prefill_slots >= 0 and drain_timeout_s > 0")

    @staticmethod
    def of(cfg: WorkerConfig) -> HostConfig:
        """A plain worker config as a host config (role settings at their defaults)."""
        if isinstance(cfg, HostConfig):
            return cfg
        return HostConfig(**{f.name: getattr(cfg, f.name) for f in fields(cfg)})

    def prefill(self) -> PrefillConfig:
        kw = {f.name: getattr(self, f.name) for f in fields(PrefillConfig)}
        kw["slots"] = self.prefill_slots or _WORKER_SLOTS_DEFAULT
        return PrefillConfig(**kw)

    def decode(self) -> DecodeConfig:
        return DecodeConfig(**{f.name: getattr(self, f.name) for f in fields(DecodeConfig)})

    def with_settings(self, settings: Mapping[str, str], **kw: Any) -> HostConfig:
        """This config with ``settings`` (field name -> text, parsed as the flags are)."""
        known = {f.name for f in fields(self)}
        bad = sorted(set(settings) - known)
        if bad:
            raise InvalidArgument(f"unknown worker settings {bad}; see pdserve serve worker "
                                  "--help", reason="UNKNOWN_SETTING")
        env = {**as_env(self), **{ENV_PREFIX + k.upper(): v for k, v in settings.items()}}
        try:
            cfg = load_config(HostConfig, [], env=env)
        except ConfigError as e:
            raise InvalidArgument(str(e), reason="BAD_SETTING") from e
        return dataclasses.replace(cfg, **kw)


class State(enum.IntEnum):
    STARTING = apb.WORKER_STATE_STARTING
    SERVING = apb.WORKER_STATE_SERVING
    DRAINING = apb.WORKER_STATE_DRAINING
    DRAINED = apb.WORKER_STATE_DRAINED
    IDLE = apb.WORKER_STATE_IDLE


class StepThread(ModelThread):
    """The prefill servicer's model thread, backed by the step loop: one thread runs
    torch whichever role this process serves (two OpenMP teams spin against each
    other, docs/engine.md)."""

    def __init__(self, steps: StepLoop) -> None:  # no executor of its own
        self._steps = steps

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await self._steps.run(fn, *args)

    def shutdown(self) -> None:
        pass  # the host stops the step loop


@dataclass(eq=False)  # hashed by identity: a set of calls in flight
class _Call:
    """One proxied call in flight; ``aborted`` once a drain timed out on it.
    ``interruptible`` while its task awaits the role's own stream (not grpc's send)."""

    task: asyncio.Task[Any] | None
    aborted: bool = False
    interruptible: bool = False

    def abort(self) -> None:
        """End the call with INSTANCE_DRAINED. Only a task waiting on the role's stream is
        cancelled: a cancel that lands in grpc's own send of a message ends the RPC with
        no status at all (grpc.aio takes it for the client's cancel), and the caller then
        waits forever. A call between messages sees ``aborted`` when its send returns."""
        self.aborted = True
        if self.task is not None and self.interruptible:
            self.task.cancel("instance drained")


@dataclass
class Switch:
    drain_ms: float = 0.0
    load_ms: float = 0.0
    weights_kept: bool = False
    pool_kept: bool = False


class RoleHost:
    def __init__(self, cfg: HostConfig, runtime: ServiceRuntime) -> None:
        self.cfg = cfg
        self.runtime = runtime
        self.steps = StepLoop()
        self.thread = StepThread(self.steps)
        self.view = RegistryView(runtime.redis)
        self.state = State.STARTING
        self.role = ""
        self.group = cfg.group
        self.home = cfg.group  # where it waits as a spare (not a served scenario)
        self.runner: Runner | None = None
        self.pool: BlockAllocator | None = None
        self._pool_shape: tuple[int, int] = (0, 0)
        self._prefix_shape: tuple[int, int] | None = None
        self.prefill_sv: PrefillServicer | None = None
        self.decode_sv: DecodeServicer | None = None
        self.fence = 0
        self.last = Switch()
        self.switches_total = 0
        self.aborted_on_drain_total = 0
        self.removed = False  # marked removed by a substitution: never registers again
        self.removal: asyncio.Task[None] | None = None
        self._calls: set[_Call] = set()
        self._empty = asyncio.Event()  # set while nothing is in flight
        self._empty.set()
        self._lock = asyncio.Lock()

    # -- the proxied data path
    def serving(self, role: str) -> PrefillServicer | DecodeServicer | None:
        if self.state is not State.SERVING or self.role != role:
            return None
        return self.prefill_sv if role == "prefill" else self.decode_sv

    @contextlib.asynccontextmanager
    async def tracked(self) -> AsyncIterator[_Call]:
        call = _Call(asyncio.current_task())
        self._calls.add(call)
        self._empty.clear()
        try:
            yield call
        finally:
            self._calls.discard(call)
            if not self._calls:
                self._empty.set()

    async def _wait_empty(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), timeout_s)

    @property
    def in_flight(self) -> int:
        return len(self._calls)

    def load(self) -> dict[str, float]:
        sv = self.serving(self.role) if self.role else None
        base = sv.load() if sv is not None else {}
        return {**base, "worker_state": float(self.state)}

    # -- lifecycle
    async def start(self) -> None:
        from services.control.actuators_local import removed_key

        # A fresh process is not the zombie an old tombstone of this id was meant for.
        await self.runtime.redis.delete(removed_key(self.group, self.runtime.instance_id))
        await self.view.start()
        if self.cfg.role != IDLE or self.cfg.preload:
            await self._load_runner(self.cfg)
        if self.cfg.role == IDLE:
            self.state = State.IDLE
            await self._register(IDLE, self.group)
        else:
            await self._become(self.cfg.role, self.cfg)
            self.state = State.SERVING
            await self._register(self.role, self.group)
        await self.runtime.serving()  # health SERVING and the ready file
        await self._health()

    async def _on_removed(self) -> None:
        """Leave the registry for good: a substitution replaced this instance while its
        heartbeat still ran (its gRPC broken, its loop alive); beating again would put
        it back into routing."""
        if self.removed:
            return
        self.removed = True
        log.error("worker %s was marked removed from %s; leaving the registry",
                  self.runtime.instance_id, self.group)
        reg, self.runtime.registration = self.runtime.registration, None
        if reg is not None:
            await reg.close()
        self.state = State.DRAINED
        await self._health()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.drain(min(self.cfg.grace_s, self.cfg.drain_timeout_s), fence=0)
        await self.view.close()
        self.steps.stop()

    # -- control
    def _check_fence(self, fence: int) -> None:
        if fence and fence < self.fence:
            raise FailedPrecondition(
                f"fencing token {fence} is older than {self.fence}: the caller is no longer "
                "the controller", reason="STALE_FENCE")
        self.fence = max(self.fence, fence)

    async def drain(self, timeout_s: float, fence: int = 0) -> None:
        self._check_fence(fence)
        async with self._lock:
            await self._drain(timeout_s or self.cfg.drain_timeout_s)

    async def assign(self, role: str, group: str, settings: Mapping[str, str],
                     timeout_s: float, fence: int = 0) -> None:
        if role not in ROLES:
            raise InvalidArgument(f"role must be prefill or decode, got {role!r}")
        if self.removed:
            raise FailedPrecondition(f"{self.runtime.instance_id} was marked removed; "
                                     "restart the process", reason="INSTANCE_REMOVED")
        self._check_fence(fence)
        async with self._lock:
            cfg = self.cfg.with_settings(settings, group=group or self.cfg.group)
            if self.state is State.SERVING and self.role == role and cfg == self.cfg:
                return  # already there: idempotent
            t0 = time.monotonic()
            await self._drain(timeout_s or self.cfg.drain_timeout_s)
            t1 = time.monotonic()
            self.state = State.STARTING
            try:
                weights_kept, pool_kept = await self._become(role, cfg)
            except BaseException:
                self.state = State.DRAINED
                await self._register(DRAINING, self.group)
                raise
            self.state = State.SERVING
            await self._register(role, self.group)
            self.last = Switch((t1 - t0) * 1e3, (time.monotonic() - t1) * 1e3,
                               weights_kept, pool_kept)
            self.switches_total += 1
            log.info("worker %s serves %s@%s (drain %.0f ms, load %.0f ms, weights %s, "
                     "pool %s)", self.runtime.instance_id, role, self.group,
                     self.last.drain_ms, self.last.load_ms,
                     "kept" if weights_kept else "loaded", "kept" if pool_kept else "new")

    async def release(self, timeout_s: float, fence: int = 0) -> None:
        self._check_fence(fence)
        async with self._lock:
            await self._drain(timeout_s or self.cfg.drain_timeout_s)
            if self.state is State.IDLE:
                return
            self.role, self.prefill_sv, self.decode_sv = "", None, None
            self.group = self.home
            self.state = State.IDLE
            await self._register(IDLE, self.group)

    async def _drain(self, timeout_s: float) -> None:
        if self.state is not State.SERVING:
            return
        t0 = time.monotonic()
        self.state = State.DRAINING
        if self.prefill_sv is not None:
            self.prefill_sv.draining = True
        await self._register(DRAINING, self.group)  # out of routing first
        await self._wait_empty(timeout_s)
        if self._calls:  # no migration (P/D-Serve): end them with a clear status
            for call in list(self._calls):
                self.aborted_on_drain_total += 1
                call.abort()
            await self._wait_empty(STUCK_SEND_S)
            for call in list(self._calls):
                # Still in a send: its caller stopped reading. Ending it without a status
                # is the lesser harm; its KV and slot are freed by the cancel.
                log.warning("worker %s: a call's send has not returned in %.0f s; cancelled",
                            self.runtime.instance_id, STUCK_SEND_S)
                if call.task is not None:
                    call.task.cancel("instance drained")
            await self._wait_empty(1.0)
        self.state = State.DRAINED
        self.last = dataclasses.replace(self.last, drain_ms=(time.monotonic() - t0) * 1e3)
        log.info("worker %s drained from %s@%s in %.0f ms", self.runtime.instance_id,
                 self.role, self.group, self.last.drain_ms)

    async def _load_runner(self, cfg: HostConfig) -> None:
        from services.engine.factory import load_runner

        self.runner = await self.steps.run(load_runner, cfg.model, cfg.cache_dir,
                                           cfg.torch_threads)
        await self.steps.run(self.runner.warmup)
        self.pool, self._pool_shape, self._prefix_shape = None, (0, 0), None
        self.steps.runner, self.steps.pool = self.runner, None

    async def _become(self, role: str, cfg: HostConfig) -> tuple[bool, bool]:
        """Build ``role``'s servicer over the kept state; reload only what changed."""
        weights_kept = self.runner is not None and cfg.model == self.cfg.model and \
            cfg.cache_dir == self.cfg.cache_dir
        if not weights_kept:
            await self._load_runner(cfg)
        assert self.runner is not None
        pool_kept = False
        if role == "decode":
            shape = (cfg.kv_pool_tokens, cfg.kv_pool_block_tokens)
            pool_kept = self.pool is not None and shape == self._pool_shape
            if not pool_kept:
                self.pool = await self.steps.run(self.runner.attach_pool, *shape)
                self._pool_shape = shape
            self.steps.pool = self.pool
            assert self.pool is not None
            self.decode_sv = DecodeServicer(cfg.decode(), self.runtime, self.runner, self.steps,
                                            self.pool)
            self.prefill_sv = None
        else:
            pcfg = cfg.prefill()
            shape2 = (pcfg.prefix_cache_mb, pcfg.prefix_block_tokens)
            if pcfg.prefix_cache_mb > 0 and self._prefix_shape != shape2:
                self.runner.attach_prefix_cache(pcfg.prefix_cache_mb << 20,
                                                pcfg.prefix_block_tokens)
                self._prefix_shape = shape2
            handoff = Handoff(pcfg, self.runner, self.thread, pcfg.kv_lease_s)
            handoff.view = self.view
            self.prefill_sv = PrefillServicer(pcfg, self.runtime, self.runner, self.thread,
                                              handoff)
            self.decode_sv = None
        self.cfg, self.role, self.group = cfg, role, cfg.group
        return weights_kept, pool_kept

    def _info(self, role: str, group: str) -> InstanceInfo:
        fp = self.runner.fingerprint if self.runner is not None else ""
        base = worker_info(self.runtime, self.cfg, fp)
        slots = 0
        if role == "prefill":
            slots = self.cfg.prefill().slots
        elif role == "decode":
            slots = self.cfg.slots
        return dataclasses.replace(base, role=role, group=group, slots=slots)

    async def _register(self, role: str, group: str) -> None:
        """Re-register under the new role (a new record; the old one is removed)."""
        if self.removed:
            return
        old = self.runtime.registration
        if old is not None:
            await old.close()
        reg = _Registration(self, self._info(role, group))
        await reg.start()
        self.runtime.registration = reg
        await self._health()
        if role == "prefill" and self.prefill_sv is not None:
            self.prefill_sv.offer_free_slots()  # the group's queue may hold waiters

    async def _health(self) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        for name, role in ((PREFILL_SERVICE, "prefill"), (DECODE_SERVICE, "decode")):
            ok = self.state is State.SERVING and self.role == role
            await self.runtime.health.set(
                name, serving if ok else health_pb2.HealthCheckResponse.NOT_SERVING)

    def status(self) -> apb.WorkerStatus:
        return apb.WorkerStatus(
            instance_id=self.runtime.instance_id, state=apb.WorkerState.Name(self.state),
            role=self.role,
            group=self.group, in_flight=self.in_flight, model=self.cfg.model,
            model_fingerprint=self.runner.fingerprint if self.runner else "", fence=self.fence,
            last_drain_ms=self.last.drain_ms, last_load_ms=self.last.load_ms,
            last_switch_ms=self.last.drain_ms + self.last.load_ms,
            weights_kept=self.last.weights_kept, pool_kept=self.last.pool_kept,
            aborted_on_drain_total=self.aborted_on_drain_total,
            switches_total=self.switches_total, address=self.runtime.address)


class _Registration(Registration):
    """The worker's lease: no beat once its id is tombstoned (``mark_removed``)."""

    def __init__(self, host: RoleHost, info: InstanceInfo) -> None:
        super().__init__(host.runtime.redis, info, host.cfg.registry_ttl_s,
                         host.cfg.heartbeat_s, host.load)
        self.host = host

    async def beat(self) -> None:
        from services.control.actuators_local import removed_key

        info = self.info
        if await self.host.runtime.redis.exists(removed_key(info.group, info.instance_id)):
            self.host.removal = asyncio.get_running_loop().create_task(self.host._on_removed())
            return
        await super().beat()


@dataclass
class Relay:
    """Runs a role servicer's stream for the host, so a drain can end it cleanly."""

    host: RoleHost
    counters: dict[str, int] = field(default_factory=dict)

    async def stream(self, inner: AsyncIterator[T], context: grpc.aio.ServicerContext,
                     what: str) -> AsyncIterator[T]:
        async with self.host.tracked() as call:
            try:
                async with contextlib.aclosing(inner) as it:  # type: ignore[type-var]
                    while not call.aborted:
                        call.interruptible = True
                        try:
                            msg = await anext(it)
                        except StopAsyncIteration:
                            return
                        finally:
                            call.interruptible = False
                        yield msg
            except asyncio.CancelledError:
                if not call.aborted:
                    raise
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            from services.common.errors import abort_with

            await abort_with(context, Aborted(
                f"{what} on {self.host.runtime.instance_id} was ended: the instance was "
                "drained for a role switch or scale-in and does not migrate requests",
                reason="INSTANCE_DRAINED"))


def not_prefill(host: RoleHost) -> ppb.PrefillResponse:
    return ppb.PrefillResponse(rejected=ppb.PrefillRejected(
        reason=ppb.REJECT_REASON_DRAINING,
        message=f"{host.runtime.instance_id} does not serve prefill now "
                f"({host.state.name.lower()} {host.role or IDLE})"))


def not_decode(host: RoleHost) -> ResourceExhausted:
    # RESOURCE_EXHAUSTED with the slots reason: the gateway tries the next decode and,
    # if all are taken, waits and retries, exactly as for a full one.
    return ResourceExhausted(
        f"{host.runtime.instance_id} does not serve decode now "
        f"({host.state.name.lower()} {host.role or IDLE}); try another decode",
        reason="DECODE_SLOTS_FULL")


def empty_decode_stats(host: RoleHost) -> dpb.GetDecodeStatsResponse:
    return dpb.GetDecodeStatsResponse(instance_id=host.runtime.instance_id)


def empty_prefill_stats(host: RoleHost) -> ppb.GetPrefillStatsResponse:
    return ppb.GetPrefillStatsResponse(instance_id=host.runtime.instance_id)
