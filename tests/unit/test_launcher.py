"""services.launcher.parse_groups: the ``--groups`` spec of ``pdserve up``."""

from __future__ import annotations

import pytest

from services.launcher import omp_env, parse_groups

pytestmark = pytest.mark.unit


def test_parses_several_groups_in_order() -> None:
    assert parse_groups("code:2p1d,conv:3p2d") == [("code", 2, 1), ("conv", 3, 2)]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("code:1p1d", [("code", 1, 1)]),
        (" code:2p1d , conv:3p2d ", [("code", 2, 1), ("conv", 3, 2)]),
        ("code:2P1D", [("code", 2, 1)]),
        ("code:10p12d,", [("code", 10, 12)]),
        (",,a:1p1d,,b:1p3d", [("a", 1, 1), ("b", 1, 3)]),
    ],
)
def test_accepted_variants(spec: str, expected: list[tuple[str, int, int]]) -> None:
    got = parse_groups(spec)
    assert got == expected
    assert all(isinstance(p, int) and isinstance(d, int) for _, p, d in got)


@pytest.mark.parametrize(
    "spec",
    [
        "code", "code:0p1d", "code:1p0d", "code:2p", "code:p1d", "code:2p1", ":2p1d",
        "code:2x1d", "code:-1p1d", "code:1.5p1d", "code:1p1d1d", "code:2p1d,conv",
    ],
)
def test_bad_specs_raise(spec: str) -> None:
    with pytest.raises(ValueError, match="bad group"):
        parse_groups(spec)


@pytest.mark.parametrize("spec", ["", " ", ",", " , ,"])
def test_no_groups_raise(spec: str) -> None:
    with pytest.raises(ValueError, match="no groups"):
        parse_groups(spec)


def test_duplicate_group_names_rejected() -> None:
    with pytest.raises(ValueError):
        parse_groups("code:1p1d,code:2p1d")



def test_model_workers_sharing_a_host_do_not_spin_wait() -> None:
    assert omp_env(2, {}) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert omp_env(1, {}) == {}  # a lone worker keeps OpenMP's default
    assert omp_env(3, {"OMP_WAIT_POLICY": "ACTIVE"}) == {}  # the user's setting wins
