"""How the controller acts: decisions, idempotent plans of steps, and the ``Actuator``
interface the mechanisms implement (local processes, Kubernetes, compose). Pure.

The controller decides (``Decision``: switch a role, move an instance between groups,
borrow a spare, release one); ``plan_for`` turns a decision into a ``Plan`` of ``Step``s
for what the actuator can do; an executor (``services.control.executor``) runs the steps.

Why plans and steps: a controller can die between any two calls. Each step names its
end state, not a change ("instance i serves decode in group g", "group g has 5 decode
replicas"), so running it again is harmless, and ``satisfied`` tells from an instance's
observed status whether it already holds. A plan is persisted with its cursor before
and after every step (``leader.PlanStore``); the next leader reloads it, skips the
steps whose end state already holds, and finishes the rest. If a step becomes
impossible (its instance died), ``Plan.aborted`` rolls back: an instance the plan
drained goes back to the role and group it had, so nothing is left half-switched.

Every actuator call carries the leader's fencing token (``fence``). An actuator must
refuse a token lower than the highest it has seen (``StaleFence``), so a deposed leader
that wakes up late cannot act.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, runtime_checkable


class Role(enum.StrEnum):
    PREFILL = "prefill"
    DECODE = "decode"
    IDLE = "idle"  # started without a role, or released: the spare pool


class State(enum.StrEnum):
    STARTING = "starting"  # process up, role's model/pool not ready yet
    SERVING = "serving"  # registered and routable in (role, group)
    DRAINING = "draining"  # not routable; in-flight work finishing or handed off
    DRAINED = "drained"  # not routable, nothing in flight, still holds its role's state
    IDLE = "idle"  # in the spare pool, no group
    GONE = "gone"  # dead, removed, or unknown


@dataclass(frozen=True)
class InstanceStatus:
    """What an actuator observes of one instance."""

    instance_id: str
    state: State
    role: str = ""
    group: str = ""
    in_flight: int = 0


class StepKind(enum.StrEnum):
    DRAIN = "drain"  # end state: DRAINED (or IDLE)
    ASSIGN = "assign"  # end state: SERVING ``role`` in ``group``
    RELEASE = "release"  # end state: IDLE (in the spare pool)
    SCALE = "scale"  # end state: ``replicas`` instances of (group, role) (scale-only actuators)


@dataclass(frozen=True)
class Step:
    kind: StepKind
    instance_id: str = ""
    role: str = ""
    group: str = ""
    replicas: int = -1
    # Where the instance was before the plan: what an abort restores after a DRAIN.
    prior_role: str = ""
    prior_group: str = ""

    def __str__(self) -> str:
        if self.kind is StepKind.SCALE:
            return f"scale {self.group}/{self.role} to {self.replicas}"
        if self.kind is StepKind.ASSIGN:
            return f"assign {self.instance_id} {self.role}@{self.group}"
        return f"{self.kind.value} {self.instance_id}"


def satisfied(step: Step, status: InstanceStatus | None, replicas: int = -1) -> bool:
    """Whether ``step``'s end state already holds (then it is skipped). ``status`` is the
    step's instance as observed; ``replicas`` the observed count for SCALE steps."""
    if step.kind is StepKind.SCALE:
        return replicas == step.replicas
    if status is None:
        return False
    if step.kind is StepKind.DRAIN:
        return status.state in (State.DRAINED, State.IDLE)
    if step.kind is StepKind.RELEASE:
        return status.state is State.IDLE
    return (status.state is State.SERVING and status.role == step.role
            and status.group == step.group)


def impossible(step: Step, status: InstanceStatus | None) -> bool:
    """The step's instance is gone: the plan cannot finish and must abort."""
    return step.kind is not StepKind.SCALE and (status is None or status.state is State.GONE)


class Kind(enum.StrEnum):
    SWITCH = "switch"  # same group, other role
    MOVE = "move"  # another group (same or other role)
    BORROW = "borrow"  # from the spare pool (or scale up)
    RELEASE = "release"  # back to the spare pool (or scale down)


@dataclass(frozen=True)
class Decision:
    """One instance changes hands. ``instance_id`` is empty for a scale-only BORROW."""

    kind: Kind
    group: str  # the group that gains (SWITCH, MOVE, BORROW) or loses (RELEASE) it
    role: str  # the role it takes (SWITCH, MOVE, BORROW) or leaves (RELEASE)
    instance_id: str = ""
    from_group: str = ""
    from_role: str = ""
    reason: str = ""

    def __str__(self) -> str:
        src = f" from {self.from_role}@{self.from_group}" if self.from_group else ""
        who = f" {self.instance_id}" if self.instance_id else ""
        return f"{self.kind.value}{who} -> {self.role}@{self.group}{src} ({self.reason})"


@dataclass(frozen=True)
class Plan:
    plan_id: str
    fence: int
    steps: tuple[Step, ...]
    reason: str = ""
    done: int = 0  # steps confirmed done; the cursor a successor resumes from
    aborted: bool = False

    @property
    def finished(self) -> bool:
        return self.done >= len(self.steps)

    def pending(self) -> Step | None:
        return None if self.finished else self.steps[self.done]

    def advance(self) -> Plan:
        return replace(self, done=min(self.done + 1, len(self.steps)))

    def abort(self) -> Plan:
        """A plan that undoes the finished DRAINs of this one (in reverse): each drained
        instance goes back to the role and group it had. Already-finished ASSIGNs stay
        (they left the instance serving somewhere, which is a consistent state)."""
        undo = tuple(Step(StepKind.ASSIGN, s.instance_id, s.prior_role, s.prior_group)
                     for s in reversed(self.steps[: self.done])
                     if s.kind is StepKind.DRAIN and s.prior_role and s.prior_group
                     and not _reassigned(self.steps[: self.done], s.instance_id))
        return Plan(f"{self.plan_id}/undo", self.fence, undo, f"undo {self.reason}",
                    aborted=True)

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @staticmethod
    def from_json(raw: str | bytes) -> Plan:
        d: dict[str, Any] = json.loads(raw)
        steps = tuple(Step(**{**s, "kind": StepKind(s["kind"])}) for s in d.pop("steps"))
        return Plan(steps=steps, **d)


def _reassigned(steps: tuple[Step, ...], instance_id: str) -> bool:
    return any(s.kind in (StepKind.ASSIGN, StepKind.RELEASE) and s.instance_id == instance_id
               for s in steps)


@dataclass(frozen=True)
class Capabilities:
    """What an actuator can do. Local processes with role switching can ``assign``
    (switch, move, borrow a named idle instance); Kubernetes and compose only scale a
    (group, role)'s replica count."""

    assign: bool = True
    scale: bool = False


def plan_for(decision: Decision, fence: int, plan_id: str, caps: Capabilities,
             replicas: dict[tuple[str, str], int] | None = None) -> Plan:
    """The steps that carry out ``decision``. ``replicas``: current (group, role) counts,
    needed by scale-only actuators (targets are absolute, so a retry cannot double)."""
    d, reps = decision, replicas or {}
    steps: list[Step]
    if caps.assign and (d.instance_id or d.kind is not Kind.BORROW):
        i = d.instance_id
        if d.kind is Kind.BORROW:
            steps = [Step(StepKind.ASSIGN, i, d.role, d.group)]
        elif d.kind is Kind.RELEASE:
            steps = [Step(StepKind.DRAIN, i, prior_role=d.role, prior_group=d.group),
                     Step(StepKind.RELEASE, i)]
        else:  # SWITCH, MOVE: drain first (stop accepting, finish in-flight), then re-role
            steps = [Step(StepKind.DRAIN, i, prior_role=d.from_role,
                          prior_group=d.from_group or d.group),
                     Step(StepKind.ASSIGN, i, d.role, d.group)]
    elif caps.scale:
        def target(g: str, r: str, delta: int) -> Step:
            return Step(StepKind.SCALE, role=r, group=g, replicas=max(0, reps[(g, r)] + delta))

        try:
            if d.kind is Kind.BORROW:
                steps = [target(d.group, d.role, +1)]
            elif d.kind is Kind.RELEASE:
                steps = [target(d.group, d.role, -1)]
            else:  # remove first: the total stays fixed
                steps = [target(d.from_group or d.group, d.from_role, -1),
                         target(d.group, d.role, +1)]
        except KeyError as e:
            raise ValueError(f"scale-only plan needs the current replicas of {e}") from None
    else:
        raise ValueError(f"the actuator can neither assign nor scale: cannot {d}")
    return Plan(plan_id, fence, tuple(steps), str(d))


class ActuatorError(Exception):
    """A step failed. ``retryable``: try again next period (the plan stays pending)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class StaleFence(ActuatorError):
    """The call's fencing token is older than one the actuator has seen: this caller is
    no longer the leader and must stop."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@runtime_checkable
class Actuator(Protocol):
    """Implemented by the mechanisms (local processes, Kubernetes Scale subresource,
    compose). Every method is idempotent: called again with the same arguments after it
    succeeded, or after a caller died half-way, it converges to the same end state and
    returns. Each returns once its end state holds (or raises ``ActuatorError``), within
    ``timeout_s``; a drain that cannot finish in-flight work by then hands it off or
    ends it with a clear status, never silently drops it."""

    capabilities: Capabilities

    async def status(self, instance_id: str) -> InstanceStatus:
        """Observed state; ``State.GONE`` for an unknown or dead instance."""
        ...

    async def replicas(self, group: str, role: str) -> int:
        """Instances of (group, role), serving or starting (scale-only actuators)."""
        ...

    async def drain(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        """Stop routing to it, finish or hand off in-flight work: end state DRAINED."""
        ...

    async def assign(self, instance_id: str, role: str, group: str, *, fence: int,
                     timeout_s: float) -> None:
        """Take ``role`` in ``group`` (from IDLE or DRAINED), keeping weights and the KV
        pool where possible; end state SERVING once registered and healthy."""
        ...

    async def release(self, instance_id: str, *, fence: int, timeout_s: float) -> None:
        """Back to the spare pool (from DRAINED): end state IDLE."""
        ...

    async def scale(self, group: str, role: str, replicas: int, *, fence: int,
                    timeout_s: float) -> None:
        """Set (group, role)'s replica count (absolute: idempotent)."""
        ...
