"""A roll to new weights keeps a prefill and a decode of one revision serving at every
step (the gateway pairs KV only with decodes of its own weights), and the gateway never
sends a request to a prefill whose weights no decode serves. Pure functions."""

from __future__ import annotations

import itertools

import pytest

from services.admin.ops import next_roll_role
from services.gateway.policy import servable_prefills


def _pair(o: dict[str, int], n: dict[str, int]) -> bool:
    return (o["prefill"] > 0 and o["decode"] > 0) or (n["prefill"] > 0 and n["decode"] > 0)


def _roll(p: int, d: int, surge: bool) -> tuple[list[str], bool]:
    """The whole roll of a pPdD group: the order, and whether a pair served throughout."""
    old, new = {"prefill": p, "decode": d}, {"prefill": 0, "decode": 0}
    order, ok = [], True
    while old["prefill"] + old["decode"]:
        r = next_roll_role(old, new, surge)
        old[r] -= 1
        ok &= surge or _pair(old, new)  # in place: the member is away meanwhile
        new[r] += 1
        ok &= _pair(old, new)
        order.append(r)
    return order, ok


@pytest.mark.parametrize(("p", "d"), [s for s in itertools.product(range(1, 6), repeat=2)
                                      if s != (1, 1)])
def test_a_pair_serves_at_every_step_with_a_spare(p: int, d: int) -> None:
    order, ok = _roll(p, d, surge=True)
    assert ok and sorted(order) == sorted(["prefill"] * p + ["decode"] * d)


def test_one_prefill_one_decode_has_no_such_order() -> None:
    """One member at a time, a 1p1d group has one step with a revision's pair missing."""
    assert not _roll(1, 1, surge=True)[1] and not _roll(1, 1, surge=False)[1]


@pytest.mark.parametrize(("p", "d"), list(itertools.product(range(2, 6), repeat=2)))
def test_a_pair_serves_at_every_step_in_place(p: int, d: int) -> None:
    assert _roll(p, d, surge=False)[1]


def test_role_by_role_order_would_break_the_pair() -> None:
    """What the roll did before: all decodes, then the prefills (none of a revision's
    prefills and decodes overlap once the last decode is new)."""
    old, new = {"prefill": 2, "decode": 2}, {"prefill": 0, "decode": 0}
    broken = False
    for r in ["decode", "decode", "prefill", "prefill"]:
        old[r] -= 1
        new[r] += 1
        broken |= not _pair(old, new)
    assert broken
    assert _roll(2, 2, surge=True)[0][:2] != ["decode", "decode"]


def test_prefills_whose_weights_no_decode_serves_are_not_asked() -> None:
    assert servable_prefills(["old", "new", "old"], ["old"]) == [0, 2]
    assert servable_prefills(["old", "new"], ["new", "old"]) == [0, 1]
    assert servable_prefills(["old", ""], ["new"]) == [1]  # unknown matches anything
    assert servable_prefills(["old", "old"], ["new"]) == [0, 1]  # none: all kept
    assert servable_prefills(["a", "b"], ["a", ""]) == [0, 1]  # a decode of unknown weights
    assert servable_prefills(["a"], []) == [0]


class _Act:
    def __init__(self) -> None:
        self.assigned: list[str] = []

    async def assign(self, instance_id: str, role: str, group: str, **kw: object) -> None:
        self.assigned.append(instance_id)


def _ops(p: int, d: int) -> tuple[object, _Act]:
    from services.admin.ops import GroupOps
    from services.cluster.registry import InstanceInfo
    from services.common.errors import FailedPrecondition

    members = [InstanceInfo(instance_id=f"{r[0]}{k}", role=r, group="g", address="")
               for r, n in (("prefill", p), ("decode", d)) for k in range(n)]

    class Ops(GroupOps):
        async def members(self, group: str) -> list[InstanceInfo]:
            return members

        async def spares(self, n: int) -> list[InstanceInfo]:
            raise FailedPrecondition("no spare")  # every member reloads in place

    act = _Act()
    return Ops(None, act), act  # type: ignore[arg-type]


async def _upgrade(p: int, d: int, settings: dict[str, str]) -> list[str]:
    ops, act = _ops(p, d)
    async for _ in ops.upgrade(["g"], settings, 1.0):  # type: ignore[attr-defined]
        pass
    return act.assigned


async def test_a_weights_roll_goes_in_the_pair_keeping_order() -> None:
    order = await _upgrade(3, 2, {"model": "new"})
    assert sorted(order) == ["d0", "d1", "p0", "p1", "p2"]
    old, new = {"prefill": 3, "decode": 2}, {"prefill": 0, "decode": 0}
    for iid in order:
        r = "prefill" if iid[0] == "p" else "decode"
        old[r] -= 1
        assert _pair(old, new)  # while it reloads in place
        new[r] += 1
        assert _pair(old, new)


async def test_a_settings_roll_keeps_its_order() -> None:
    assert await _upgrade(2, 2, {"slots": "8"}) == ["d0", "d1", "p0", "p1"]
