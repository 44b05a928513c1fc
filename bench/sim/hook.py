"""The simulator's control hook: how a ratio controller runs inside ``bench.sim``.

Every ``SimConfig.control_period_ms`` of virtual time the simulator calls the
user-supplied **pure** callback

    control(snapshots: Sequence[GroupSnapshot]) -> Sequence[Reassign]

with one ``GroupSnapshot`` per scenario group it simulates (all groups when the run is
one process, ``--workers 1``; a shard's groups otherwise, so cross-group moves need
``--workers 1``). The callback reads nothing else and keeps its own state if it wants
(a closure or an object with ``__call__``); it must not read a clock: ``now_ms`` is in
the snapshot. It returns the reassignments to make now, possibly none.

A ``Reassign(instance_id, role, group)`` is applied with drain semantics, as the live
role switch does (docs/operations.md): the instance leaves routing at once (no new request is
sent to it), its in-flight work finishes (a prefill's busy slots and local FIFO, a
decode's batch), and only then does it join ``group`` (default: its own) as ``role``
(``"prefill"`` or ``"decode"``) and become routable there, after
``SimConfig.switch_ms`` (the reload time of the new role). Reassigning an instance that
is already draining is ignored (idempotent); a reassignment to the role and group it
already has is a no-op. The simulator never leaves a pool empty on its own account:
a controller that drains a group's last prefill gets exactly that (requests then wait
in the forwarding queue until their deadline), which the invariant tests catch.

Use ``per_group(fn)`` to turn a one-group function ``fn(GroupSnapshot) ->
Sequence[Reassign]`` (e.g. ``services.control``'s pure per-group controller) into the
callback. From the command line, ``--control MODULE:FACTORY`` names a zero-argument
factory returning the callback, so that it can be built inside each worker process.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

PREFILL = "prefill"
DECODE = "decode"


@dataclass(frozen=True)
class GroupSnapshot:
    """One scenario group over the last control period (``period_ms`` up to ``now_ms``).

    Means are over the requests that *finished* in the period (ok or not); TTFT only
    over those that got a first token. ``ttft_share`` is mean(TTFT / E2E) over the
    finished-ok requests: the P/D-Serve §1.3 signal (up with E2E: add prefill; down with
    E2E: add decode)."""

    group: str
    now_ms: float
    period_ms: float
    arrived: int  # requests that arrived in the period
    finished: int  # ended with all their tokens
    failed: int  # ended with an error (deadline, no slot)
    cancelled: int  # ended by the client
    slo_met: int  # finished with TTFT <= its SLO
    mean_ttft_ms: float  # nan when nothing finished
    mean_e2e_ms: float
    ttft_share: float
    queue_depth: int  # waiting in the forwarding queue now
    decode_waiting: int  # prefilled, waiting for a decode slot now
    prefill_busy: float  # busy prefill slot-time / slot-time over the period, 0..1
    decode_busy: float  # mean decode batch size / decode slots over the period, 0..1
    prefills: tuple[str, ...]  # routable prefill instance ids
    decodes: tuple[str, ...]  # routable decode instance ids
    draining: tuple[tuple[str, str, str], ...]  # (instance id, to role, to group)

    @property
    def n_p(self) -> int:
        return len(self.prefills)

    @property
    def n_d(self) -> int:
        return len(self.decodes)


@dataclass(frozen=True)
class Reassign:
    instance_id: str
    role: str  # PREFILL or DECODE
    group: str = ""  # "" = the instance's current group


Control = Callable[[Sequence[GroupSnapshot]], Sequence[Reassign]]


def per_group(fn: Callable[[GroupSnapshot], Sequence[Reassign]]) -> Control:
    """A callback that asks ``fn`` once per group and concatenates the answers."""

    def control(snapshots: Sequence[GroupSnapshot]) -> Sequence[Reassign]:
        out: list[Reassign] = []
        for s in snapshots:
            out.extend(fn(s))
        return out

    return control


def load_control(spec: str) -> Control:
    """``"package.module:factory"`` -> ``factory()``: the callback, built where it runs."""
    import importlib

    mod, _, name = spec.partition(":")
    if not mod or not name:
        raise ValueError(f"--control {spec!r}: expected MODULE:FACTORY")
    factory = getattr(importlib.import_module(mod), name)
    control: Control = factory()
    return control
