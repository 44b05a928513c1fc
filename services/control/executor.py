"""Runs plans step by step against an ``Actuator``, persisting the cursor after every
step so a successor leader finishes (or undoes) whatever a dead one left.

For each step: observe; skip it if its end state already holds (``satisfied``); abort
the plan, running its undo instead, if its instance is gone (``impossible``); else call
the actuator (idempotent) and record the step as done. Every write is fenced, so a
deposed leader stops at its next step (``StaleFence``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Protocol

from services.control.actuator import (
    Actuator,
    ActuatorError,
    InstanceStatus,
    Plan,
    StaleFence,
    Step,
    StepKind,
    impossible,
    satisfied,
)

log = logging.getLogger(__name__)


class Store(Protocol):
    async def save(self, plan: Plan, lease_value: str) -> None: ...

    async def finish(self, plan: Plan, lease_value: str) -> None: ...


async def _observe(actuator: Actuator, step: Step) -> tuple[InstanceStatus | None, int]:
    if step.kind is StepKind.SCALE:
        return None, await actuator.replicas(step.group, step.role)
    return await actuator.status(step.instance_id), -1


async def _apply(actuator: Actuator, step: Step, fence: int, timeout_s: float) -> None:
    if step.kind is StepKind.DRAIN:
        await actuator.drain(step.instance_id, fence=fence, timeout_s=timeout_s)
    elif step.kind is StepKind.ASSIGN:
        await actuator.assign(step.instance_id, step.role, step.group, fence=fence,
                              timeout_s=timeout_s)
    elif step.kind is StepKind.RELEASE:
        await actuator.release(step.instance_id, fence=fence, timeout_s=timeout_s)
    else:
        await actuator.scale(step.group, step.role, step.replicas, fence=fence,
                             timeout_s=timeout_s)


async def run_plan(plan: Plan, actuator: Actuator, store: Store, fence: int,
                   lease_value: str, timeout_s: float = 60.0) -> Plan:
    """Carry ``plan`` to its end under ``fence``; returns the plan as it ended (finished,
    or the finished undo of an aborted one). A retryable ``ActuatorError`` propagates
    with the plan saved at its cursor, to be resumed next period."""
    if plan.fence != fence:  # adopted from a predecessor: act under our own token
        plan = replace(plan, fence=fence)
    await store.save(plan, lease_value)
    while not plan.finished:
        step = plan.pending()
        assert step is not None
        status, reps = await _observe(actuator, step)
        if satisfied(step, status, reps):
            plan = plan.advance()
            await store.save(plan, lease_value)
            continue
        if impossible(step, status):
            if plan.aborted:  # nothing to restore on a dead instance: skip
                log.warning("plan %s: %s impossible (instance gone), skipped",
                            plan.plan_id, step)
                plan = plan.advance()
                await store.save(plan, lease_value)
                continue
            log.warning("plan %s: %s impossible (instance gone): undoing", plan.plan_id, step)
            undo = plan.abort()
            await store.finish(plan, lease_value)
            return await run_plan(undo, actuator, store, fence, lease_value, timeout_s)
        try:
            await _apply(actuator, step, fence, timeout_s)
        except StaleFence:
            raise
        except ActuatorError as e:
            if e.retryable:
                raise
            log.warning("plan %s: %s failed for good (%s): undoing", plan.plan_id, step, e)
            undo = plan.abort()
            await store.finish(plan, lease_value)
            if plan.aborted:
                return undo
            return await run_plan(undo, actuator, store, fence, lease_value, timeout_s)
        plan = plan.advance()
        await store.save(plan, lease_value)
    await store.finish(plan, lease_value)
    return plan
