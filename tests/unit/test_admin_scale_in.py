"""services.admin.ops: a scale-in goes on when a member vanishes under it (a dead
member's registry record outlives it by its lease), and still fails on a live one."""

from __future__ import annotations

from typing import Any

import pytest

from services.admin.ops import GroupOps
from services.cluster.registry import InstanceInfo
from services.control.actuator import ActuatorError, InstanceStatus, State

pytestmark = pytest.mark.unit


class FakeActuator:
    """Records the steps; ``gone`` members fail every step and report GONE."""

    def __init__(self, gone: set[str], failing: frozenset[str] = frozenset()) -> None:
        self.gone, self.failing = gone, failing
        self.steps: list[tuple[str, str]] = []

    async def _step(self, what: str, instance_id: str) -> None:
        if instance_id in self.gone or instance_id in self.failing:
            raise ActuatorError(f"{instance_id} is not registered (gone?)", retryable=False)
        self.steps.append((what, instance_id))

    async def drain(self, instance_id: str, **_: Any) -> None:
        await self._step("drain", instance_id)

    async def release(self, instance_id: str, **_: Any) -> None:
        await self._step("release", instance_id)

    async def status(self, instance_id: str) -> InstanceStatus:
        return InstanceStatus(instance_id, State.GONE if instance_id in self.gone
                              else State.SERVING)


def _ops(act: FakeActuator, ids: list[str]) -> GroupOps:
    ops = GroupOps(client=None, actuator=act)  # type: ignore[arg-type]

    async def members(group: str) -> list[InstanceInfo]:
        return [InstanceInfo(i, "decode" if i.startswith("d") else "prefill", group, "x:1")
                for i in ids]

    ops.members = members  # type: ignore[method-assign]
    return ops


async def test_a_member_gone_mid_scale_in_is_skipped() -> None:
    act = FakeActuator(gone={"d0"})
    events = [e async for e in _ops(act, ["p0", "d0", "d1"]).scale_in("g", 5.0)]
    assert [e.step for e in events] == ["", "drain", "release", "gone", "release", "done"]
    assert act.steps == [("drain", "p0"), ("drain", "d1"), ("release", "p0"), ("release", "d1")]


async def test_a_live_member_that_fails_still_fails_the_operation() -> None:
    act = FakeActuator(gone=set(), failing=frozenset({"d1"}))
    with pytest.raises(ActuatorError):
        _ = [e async for e in _ops(act, ["p0", "d1"]).scale_in("g", 5.0)]
