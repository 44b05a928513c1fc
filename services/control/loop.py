"""The live control loop: every gateway replica runs one; only the lease holder acts.

Per gateway (``StatsWindow`` + ``publish``): every finished request is recorded in a
pure per-group window (E2E, TTFT share, tokens, prefill and transfer time, TPOT); at
each period boundary the window is added into Redis, into a hash per period shared by
all gateways (``pdserve:{control}:obs:<period>``, fields ``<group>\\x1f<metric>``,
HINCRBYFLOAT, expiring after 10 periods). Periods are wall-clock aligned
(``floor(unix_s / period_s)``), so the gateways' windows add up without coordination.

The leader (``ControlLoop.tick``, once per period, a little after the boundary):
1. finishes plans a predecessor left (``PlanStore.pending``), under its own fence;
2. builds the ``FleetView``: members from the registry (``idle`` role = the spare pool,
   in-flight from their load reports), the last complete period's totals, instances
   named by unfinished plans as "changing", and per group a ``LiveEstimate`` profile;
3. asks the ``RatioController`` (restored from Redis when it became leader);
4. saves the controller state and each decision's plan (fenced), then runs the plans
   concurrently through the ``Actuator`` (``executor.run_plan``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.cluster.registry import InstanceInfo, list_instances
from services.common.tasks import cancel_and_wait
from services.control.actuator import Actuator, ActuatorError, StaleFence, plan_for
from services.control.controller import FleetView, GroupView, Member, Obs, RatioController
from services.control.executor import run_plan
from services.control.leader import LeaderElector, PlanStore
from services.control.perfmodel import DECODE, PREFILL, LiveEstimate

log = logging.getLogger(__name__)

SEP = "\x1f"
METRICS = ("n", "failed", "e2e", "share", "prompt", "out", "prefill", "xi", "tpot", "tpot_n")


def obs_key(period: int) -> str:
    return f"pdserve:{{control}}:obs:{period}"


def period_of(unix_s: float, period_s: float) -> int:
    return int(unix_s // period_s)


@dataclass
class StatsWindow:
    """One gateway's per-group sums since the last flush (pure)."""

    sums: dict[str, dict[str, float]] = field(default_factory=dict)

    def record(self, group: str, ok: bool, e2e_ms: float = 0.0, ttft_ms: float = 0.0,
               prompt_tokens: int = 0, output_tokens: int = 0, prefill_ms: float = 0.0,
               kv_transfer_ms: float = 0.0, mean_tpot_ms: float = 0.0) -> None:
        s = self.sums.setdefault(group, dict.fromkeys(METRICS, 0.0))
        s["n"] += 1
        if not ok:
            s["failed"] += 1
            return
        s["e2e"] += e2e_ms
        s["share"] += ttft_ms / e2e_ms if e2e_ms > 0 else 1.0
        s["prompt"] += prompt_tokens
        s["out"] += output_tokens
        s["prefill"] += prefill_ms
        s["xi"] += kv_transfer_ms
        if output_tokens > 1 and mean_tpot_ms > 0:
            s["tpot"] += mean_tpot_ms
            s["tpot_n"] += 1

    def take(self) -> dict[str, dict[str, float]]:
        out, self.sums = self.sums, {}
        return out


async def publish(client: Any, window: StatsWindow, period: int, period_s: float) -> None:
    """Add the window into the shared hash of ``period`` (all gateways sum into it)."""
    sums = window.take()
    if not sums:
        return
    key = obs_key(period)
    async with client.pipeline(transaction=False) as pipe:
        for g, s in sums.items():
            for m, v in s.items():
                if v:
                    pipe.hincrbyfloat(key, f"{g}{SEP}{m}", v)
        pipe.expire(key, max(10, int(10 * period_s)))
        await pipe.execute()


async def read_period(client: Any, period: int) -> dict[str, dict[str, float]]:
    raw = await client.hgetall(obs_key(period))
    out: dict[str, dict[str, float]] = {}
    for k, v in raw.items():
        g, _, m = k.decode().partition(SEP)
        out.setdefault(g, dict.fromkeys(METRICS, 0.0))[m] = float(v)
    return out


def observation(s: dict[str, float], period_s: float) -> Obs:
    ok = s["n"] - s["failed"]
    return Obs(int(s["n"]), int(s["failed"]), s["e2e"] / ok if ok > 0 else math.nan,
               s["share"] / ok if ok > 0 else math.nan, s["n"] / period_s)


class ControlLoop:
    """Hosted by a gateway (or any process with Redis and an actuator)."""

    def __init__(self, client: Any, elector: LeaderElector, actuator: Actuator,
                 controller: RatioController | None = None, period_s: float = 10.0,
                 step_timeout_s: float = 120.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.client = client
        self.elector = elector
        self.actuator = actuator
        self.controller = controller or RatioController()
        self.store = PlanStore(client)
        self.period_s = period_s
        self.step_timeout_s = step_timeout_s
        self.clock = clock
        self.window = StatsWindow()
        self.estimates: dict[str, LiveEstimate] = {}
        self._restored_fence = 0
        self._tasks: list[asyncio.Task[None]] = []
        self.decided: list[str] = []  # recent decisions, for status and tests

    # -- every gateway -------------------------------------------------------------------
    async def flush(self, period: int | None = None) -> None:
        """Publish the window into ``period`` (default: the one that just ended: flushes
        run just after a boundary)."""
        p = period if period is not None else \
            period_of(self.clock() - self.period_s / 2, self.period_s)
        try:
            await publish(self.client, self.window, p, self.period_s)
        except Exception as e:  # stats are best effort; serving goes on
            log.warning("control stats flush failed: %s", e)

    # -- the leader ----------------------------------------------------------------------
    async def view(self, period: int) -> FleetView:
        totals = await read_period(self.client, period)
        insts = await list_instances(self.client)
        pending = await self.store.pending()
        busy_ids = {s.instance_id for p in pending for s in p.steps[p.done:] if s.instance_id}
        by_group: dict[str, dict[str, list[InstanceInfo]]] = {}
        spares: list[str] = []
        switching: dict[str, int] = {}  # group -> workers draining out of a role
        for i in insts:
            if i.role == "idle":
                spares.append(i.instance_id)
            elif i.role in (PREFILL, DECODE):
                by_group.setdefault(i.group, {PREFILL: [], DECODE: []})[i.role].append(i)
            elif i.role == "draining":  # a role-switchable worker between roles
                switching[i.group] = switching.get(i.group, 0) + 1
        groups = []
        for g, roles in sorted(by_group.items()):
            s = totals.get(g, dict.fromkeys(METRICS, 0.0))
            obs = observation(s, self.period_s)
            prof = self._estimate(g, s, roles)

            def members(xs: list[InstanceInfo]) -> tuple[Member, ...]:
                return tuple(Member(x.instance_id, int(x.load.get("busy", 0)
                                                       + x.load.get("active", 0)))
                             for x in xs if x.instance_id not in busy_ids)

            changing = switching.get(g, 0) + sum(
                1 for p in pending if any(g in (st.group, st.prior_group)
                                          for st in p.steps[p.done:]))
            groups.append(GroupView(g, obs, members(roles[PREFILL]), members(roles[DECODE]),
                                    changing, prof))
        return FleetView(tuple(groups), tuple(sorted(x for x in spares if x not in busy_ids)))

    def _estimate(self, g: str, s: dict[str, float],
                  roles: dict[str, list[InstanceInfo]]) -> Any:
        est = self.estimates.setdefault(g, LiveEstimate(alpha=0.3))
        ok = s["n"] - s["failed"]
        if ok > 0 and s["tpot_n"] > 0:
            batch = [x.load.get("active", 0.0) for x in roles[DECODE]]
            est.observe(s["prefill"] / ok, s["xi"] / ok, s["tpot"] / s["tpot_n"],
                        round(s["out"] / ok), sum(batch) / len(batch) if batch else 1.0)
        b_p = max((x.slots for x in roles[PREFILL]), default=1) or 1
        b_d = max((x.slots for x in roles[DECODE]), default=1) or 1
        return est.profile(b_p, b_d, prefill_parallel=False, min_samples=2)

    async def tick(self) -> list[str]:
        """One control period, if this process leads. Returns what it decided."""
        if not self.elector.is_leader():
            return []
        fence, lease = self.elector.fence, self.elector.lease_value
        if self._restored_fence != fence:  # newly elected: pick up where the last left
            self.controller.restore(await self.store.load_state())
            self._restored_fence = fence
        for plan in await self.store.pending():
            await self._run(plan, fence, lease)
        period = period_of(self.clock(), self.period_s) - 1
        view = await self.view(period)
        decisions = self.controller.decide(view)
        for gv in view.groups:  # one line per group and period: what the controller saw
            st = self.controller.state.get(gv.group)
            log.info("control period %d: %s P%d/D%d, %d ended (%d failed), E2E %.0f ms, "
                     "TTFT share %.2f, %.2f req/s, Eq. 1 %s | %s", period, gv.group, gv.n_p,
                     gv.n_d, gv.obs.requests, gv.obs.failed, gv.obs.mean_e2e_ms,
                     gv.obs.ttft_share, gv.obs.arrival_rps,
                     f"{gv.profile.capacity(gv.n_p, gv.n_d):.2f} req/s" if gv.profile
                     else "-", st.last if st else "")
        await self.store.save_state(self.controller.snapshot(), lease)
        caps = self.actuator.capabilities
        reps: dict[tuple[str, str], int] = {}
        if caps.scale and not caps.assign:
            for gv in view.groups:
                reps[(gv.group, PREFILL)] = await self.actuator.replicas(gv.group, PREFILL)
                reps[(gv.group, DECODE)] = await self.actuator.replicas(gv.group, DECODE)
        plans = [plan_for(d, fence, f"{fence}.{period}.{k}", caps, reps)
                 for k, d in enumerate(decisions)]
        for p in plans:  # all persisted before any acts: a crash leaves them resumable
            await self.store.save(p, lease)
        await asyncio.gather(*(self._run(p, fence, lease) for p in plans))
        out = [str(d) for d in decisions]
        self.decided = (self.decided + out)[-100:]
        for line in out:
            log.info("control: %s", line)
        return out

    async def _run(self, plan: Any, fence: int, lease: str) -> None:
        try:
            await run_plan(plan, self.actuator, self.store, fence, lease, self.step_timeout_s)
        except StaleFence:
            log.warning("control: lost the lease during plan %s; the next leader resumes it",
                        plan.plan_id)
        except ActuatorError as e:
            log.warning("control: plan %s paused at step %d: %s (retried next period)",
                        plan.plan_id, plan.done, e)

    # -- running -------------------------------------------------------------------------
    async def start(self) -> None:
        await self.elector.start()
        self._tasks = [asyncio.create_task(self._every(self.flush, 0.0), name="control-flush"),
                       asyncio.create_task(self._every(self._tick_safe, 0.25),
                                           name="control-tick")]

    async def _tick_safe(self) -> None:
        try:
            await self.tick()
        except Exception:  # one bad period (Redis blip) must not stop the loop
            log.exception("control period failed")

    async def _every(self, fn: Callable[[], Awaitable[None]], offset: float) -> None:
        """Call ``fn`` just after every period boundary (+ ``offset`` of a period)."""
        while True:
            now = self.clock()
            nxt = (period_of(now, self.period_s) + 1 + offset) * self.period_s
            await asyncio.sleep(max(0.0, nxt - now))
            await fn()

    async def close(self) -> None:
        for t in self._tasks:
            await cancel_and_wait(t)
        await self.flush()
        await self.elector.close()
