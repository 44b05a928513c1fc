"""Group operations (P/D-Serve §1.3 and §1.4) over role-switchable workers, through the
``WorkerActuator``: each operation is a sequence of the workers' own idempotent steps
(drain, assign, release), reported as it goes (``OpEvent``).

- scale out: a whole new group (n_p prefill + n_d decode) from the spare pool.
- scale in: every member leaves routing at once (concurrent drains; each re-registers
  as "draining" before it waits for its in-flight work), then each is released to the
  spare pool.
- rolling upgrade: one group after another, one member at a time, ratio kept: with a
  spare, the spare takes the member's role with the new settings first, then the member
  is released (it becomes the next spare); without one, the member drains and reloads
  in place (its group is one instance short meanwhile).
- substitution: a member whose lease lapsed or whose health check fails is marked
  removed (its record dropped: nothing routed or transferred to it) and one spare takes
  its role in its group. Its requests already ended with a clear status on their own
  (gateway and decode end them on the broken stream; no migration, as in the paper).

Operator calls are unfenced (fence 0, manual) and serialised by one lock here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Mapping
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pdserve.v1 import admin_service_pb2 as apb
from services.cluster.registry import InstanceInfo, list_instances
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.runtime import new_channel
from services.control.actuator import ActuatorError, State
from services.control.actuators_local import IDLE, WorkerActuator, mark_removed

log = logging.getLogger(__name__)
ROLES = ("prefill", "decode")


def next_roll_role(old: Mapping[str, int], new: Mapping[str, int], surge: bool) -> str:
    """The role to roll next when a group changes weights (pure).

    A gateway pairs a prefill's KV only with decodes of the same weights, so requests are
    served while some revision has both a prefill and a decode. Pick a role whose step
    keeps such a pair after it and, for an in-place reload (no spare, ``surge`` False),
    while the member is away; among those, one that completes the new revision's first
    pair, else the role with more members still on the old weights. ``old``: members of
    each role left to roll; ``new``: those already rolled. Every shape but 1p1d has such
    an order with a spare, and every shape of at least 2p2d has one in place; a 1p1d group
    has one step with no pair (in place: each reload)."""
    def pair(o: Mapping[str, int], n: Mapping[str, int]) -> bool:
        return (o["prefill"] > 0 and o["decode"] > 0) or (n["prefill"] > 0 and n["decode"] > 0)

    best: tuple[tuple[bool, bool, bool, int], str] | None = None
    for r in ROLES:
        if old.get(r, 0) <= 0:
            continue
        other = "decode" if r == "prefill" else "prefill"
        o = {**{x: old.get(x, 0) for x in ROLES}, r: old[r] - 1}
        n = {x: new.get(x, 0) for x in ROLES}
        away = surge or pair(o, n)
        after = pair(o, {**n, r: n[r] + 1})
        key = (after and away, after, n[r] == 0 and n[other] > 0, old[r])
        if best is None or key > best[0]:
            best = (key, r)
    if best is None:
        raise ValueError("no member left to roll")
    return best[1]


Events = AsyncGenerator[apb.OpEvent, None]


class Op:
    """One operation's event stream and clock."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def ev(self, msg: str, step: str = "", instance_id: str = "", done: bool = False,
           ok: bool = True) -> apb.OpEvent:
        log.info("admin: %s", msg)
        return apb.OpEvent(message=msg, step=step, instance_id=instance_id,
                           elapsed_ms=(time.monotonic() - self.t0) * 1e3, done=done, ok=ok)


async def healthy(address: str, timeout_s: float = 1.0) -> bool:
    async with new_channel(address) as ch:
        try:
            r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=timeout_s)
        except grpc.aio.AioRpcError:
            return False
    return bool(r.status == health_pb2.HealthCheckResponse.SERVING)


class GroupOps:
    def __init__(self, client: Any, actuator: WorkerActuator, fail_after: int = 3) -> None:
        self.client = client
        self.act = actuator
        self.fail_after = fail_after  # consecutive failed health checks = failed
        self.fails: dict[str, int] = {}
        self.missing: dict[str, int] = {}  # consecutive rounds without a record
        # The last record seen of each member: a lapsed lease drops the record, and the
        # substitution still needs its role and group.
        self.seen: dict[str, InstanceInfo] = {}
        self.lock = asyncio.Lock()

    async def instances(self) -> list[InstanceInfo]:
        found = await list_instances(self.client)
        for i in found:
            if i.role in ROLES:
                self.seen[i.instance_id] = i
            elif i.instance_id in self.seen and i.role in (IDLE, "draining"):
                del self.seen[i.instance_id]  # it left its role on purpose
        return found

    async def list_groups(self) -> apb.ListGroupsResponse:
        out = apb.ListGroupsResponse()
        groups: dict[str, apb.GroupInfo] = {}
        for i in sorted(await self.instances(), key=lambda i: (i.group, i.role, i.instance_id)):
            state = "serving" if i.role in ROLES else i.role
            m = apb.Member(instance_id=i.instance_id, role=i.role, group=i.group,
                           address=i.address, state=state)
            if i.role == IDLE:
                out.spares.append(m)
                continue
            if i.role not in (*ROLES, "draining"):
                continue  # gateway, kvstore, admin: not group members
            g = groups.setdefault(i.group, apb.GroupInfo(name=i.group))
            g.members.append(m)
            g.prefill += i.role == "prefill"
            g.decode += i.role == "decode"
        out.groups.extend(groups[k] for k in sorted(groups))
        return out

    async def spares(self, n: int) -> list[InstanceInfo]:
        ready = []
        for i in [i for i in await self.instances() if i.role == IDLE]:
            if (await self.act.status(i.instance_id)).state is State.IDLE:
                ready.append(i)
        if len(ready) < n:
            raise FailedPrecondition(
                f"needs {n} idle workers, the spare pool has {len(ready)}; start more "
                "(pdserve up --spares N, or pdserve serve worker)", reason="NOT_ENOUGH_SPARES")
        return ready[:n]

    async def members(self, group: str) -> list[InstanceInfo]:
        return [i for i in await self.instances() if i.group == group and i.role in ROLES]

    # -- scale ---------------------------------------------------------------------
    async def scale_out(self, group: str, n_p: int, n_d: int, timeout_s: float) -> Events:
        op = Op()
        if not group or n_p < 1 or n_d < 1:
            raise InvalidArgument("scale-out needs a group name and >= 1 prefill and decode")
        if await self.members(group):
            raise FailedPrecondition(f"group {group!r} exists; scale out adds a whole new group",
                                     reason="GROUP_EXISTS")
        picked = await self.spares(n_p + n_d)
        roles = ["prefill"] * n_p + ["decode"] * n_d
        # Decodes first: a prefill that serves before any decode would take requests
        # that then wait for one.
        order = sorted(zip(picked, roles, strict=True), key=lambda x: x[1] != "decode")
        yield op.ev(f"scale out {group}: {n_p}p{n_d}d from spares "
                    f"{', '.join(i.instance_id for i in picked)}")
        await asyncio.gather(*(self.act.assign(i.instance_id, r, group, fence=0,
                                               timeout_s=timeout_s) for i, r in order))
        for i, r in order:
            yield op.ev(f"{i.instance_id} serves {r}@{group}", "assign", i.instance_id)
        yield op.ev(f"group {group} serving {n_p}p{n_d}d", "done", done=True)

    async def scale_in(self, group: str, timeout_s: float) -> Events:
        op = Op()
        members = await self.members(group)
        if not members:
            raise NotFound(f"no group {group!r} with prefill or decode members",
                           reason="UNKNOWN_GROUP")
        yield op.ev(f"scale in {group}: {len(members)} members leave routing and drain")
        left = await asyncio.gather(*(self._unless_gone(
            i.instance_id, self.act.drain(i.instance_id, fence=0, timeout_s=timeout_s))
            for i in members))
        yield op.ev(f"{group} drained", "drain")
        for i, there in zip(members, left, strict=True):
            if there and await self._unless_gone(i.instance_id, self.act.release(
                    i.instance_id, fence=0, timeout_s=timeout_s)):
                yield op.ev(f"{i.instance_id} released to the spare pool", "release",
                            i.instance_id)
            else:
                yield op.ev(f"{i.instance_id} was gone already (exited, or its lease lapsed)",
                            "gone", i.instance_id)
        yield op.ev(f"group {group} removed", "done", done=True)

    async def _unless_gone(self, instance_id: str, step: Awaitable[Any]) -> bool:
        """Run one step on ``instance_id``; False when it failed because the instance is
        gone (a dead member's record may outlive it by its lease): nothing is left to do
        there, and the operation goes on with the others."""
        try:
            await step
            return True
        except ActuatorError:
            if (await self.act.status(instance_id)).state is State.GONE:
                return False
            raise

    # -- rolling upgrade -------------------------------------------------------------
    async def upgrade(self, groups: list[str], settings: Mapping[str, str],
                      timeout_s: float) -> Events:
        op = Op()
        if not settings:
            raise InvalidArgument("an upgrade needs settings, e.g. model=... or slots=8")
        names = groups or sorted({i.group for i in await self.instances() if i.role in ROLES})
        for g in names:
            members = await self.members(g)
            if not members:
                raise NotFound(f"no group {g!r}", reason="UNKNOWN_GROUP")
            shape = (sum(i.role == "prefill" for i in members),
                     sum(i.role == "decode" for i in members))
            yield op.ev(f"upgrading group {g} ({shape[0]}p{shape[1]}d), one member at a time")
            todo = sorted(members, key=lambda i: (i.role, i.instance_id))
            done = dict.fromkeys(ROLES, 0)
            while todo:
                spare = None
                try:
                    spare = (await self.spares(1))[0]
                except FailedPrecondition:
                    pass
                m = todo[0]
                if "model" in settings:  # new weights: keep a prefill/decode pair serving
                    left = {r: sum(i.role == r for i in todo) for r in ROLES}
                    role = next_roll_role(left, done, surge=spare is not None)
                    m = next(i for i in todo if i.role == role)
                todo.remove(m)
                done[m.role] += 1
                if spare is not None:  # surge: the group never drops below its shape
                    await self.act.assign(spare.instance_id, m.role, g, fence=0,
                                          timeout_s=timeout_s, settings=dict(settings))
                    yield op.ev(f"{spare.instance_id} took {m.role}@{g} with the new settings",
                                "assign", spare.instance_id)
                    await self.act.release(m.instance_id, fence=0, timeout_s=timeout_s)
                    yield op.ev(f"{m.instance_id} released (next spare)", "release",
                                m.instance_id)
                else:
                    await self.act.assign(m.instance_id, m.role, g, fence=0,
                                          timeout_s=timeout_s, settings=dict(settings))
                    yield op.ev(f"{m.instance_id} reloaded in place as {m.role}@{g}", "assign",
                                m.instance_id)
            after = await self.members(g)
            kept = (sum(i.role == "prefill" for i in after),
                    sum(i.role == "decode" for i in after))
            yield op.ev(f"group {g} upgraded, ratio {kept[0]}p{kept[1]}d", "group", ok=True)
        yield op.ev("upgrade finished", "done", done=True)

    # -- substitution ----------------------------------------------------------------
    async def failed(self) -> list[InstanceInfo]:
        """Members whose lease lapsed (seen before, no record now) or whose health check
        failed ``fail_after`` times in a row."""
        live = {i.instance_id: i for i in await self.instances()}
        out = []
        for iid, i in self.seen.items():
            # Twice in a row: a worker switching roles is briefly between two records.
            self.missing[iid] = self.missing.get(iid, 0) + 1 if iid not in live else 0
            if self.missing[iid] >= 2:
                out.append(i)
        for iid, i in live.items():
            if i.role not in ROLES:
                continue
            if await healthy(i.address):
                self.fails.pop(iid, None)
                continue
            self.fails[iid] = self.fails.get(iid, 0) + 1
            if self.fails[iid] >= self.fail_after:
                out.append(i)
        return out

    async def substitute(self, instance_id: str, timeout_s: float) -> Events:
        op = Op()
        if instance_id:
            live = {i.instance_id: i for i in await self.instances()}
            target = live.get(instance_id) or self.seen.get(instance_id)
            if target is None:
                raise NotFound(f"{instance_id} was never seen in a prefill or decode role",
                               reason="UNKNOWN_INSTANCE")
            if instance_id in live and await healthy(target.address, 2.0):
                raise FailedPrecondition(
                    f"{instance_id} holds its lease and answers health checks; nothing to "
                    "substitute (drain or scale in instead)", reason="INSTANCE_HEALTHY")
            targets = [target]
        else:
            targets = await self.failed()
        if not targets:
            yield op.ev("no failed instance", "done", done=True)
            return
        for t in targets:
            await mark_removed(self.client, t.group, t.instance_id)
            self.seen.pop(t.instance_id, None)
            self.fails.pop(t.instance_id, None)
            self.missing.pop(t.instance_id, None)
            yield op.ev(f"{t.instance_id} ({t.role}@{t.group}) marked removed", "remove",
                        t.instance_id)
            spare = (await self.spares(1))[0]
            await self.act.assign(spare.instance_id, t.role, t.group, fence=0,
                                  timeout_s=timeout_s)
            yield op.ev(f"{spare.instance_id} substitutes {t.instance_id} as {t.role}@{t.group}",
                        "assign", spare.instance_id)
        yield op.ev(f"{len(targets)} substituted", "done", done=True)

    async def watch(self, period_s: float, timeout_s: float) -> None:
        """Automatic substitution (``auto_substitute``): every period, substitute what
        ``failed`` finds. Failures are logged and retried next period."""
        while True:
            await asyncio.sleep(period_s)
            try:
                async with self.lock:
                    async for e in self.substitute("", timeout_s):
                        if e.step in ("remove", "assign"):
                            log.warning("auto-substitution: %s", e.message)
            except (ActuatorError, FailedPrecondition, NotFound) as e:
                log.warning("auto-substitution paused: %s", e)
            except Exception:
                log.exception("auto-substitution round failed")
