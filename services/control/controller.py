"""The online P/D ratio controller (P/D-Serve §1.3), one state per group, pure.

Every control period the caller passes a ``FleetView`` (per group: what finished in the
period, the routable members, instances mid-switch, optionally Eq. 1's profile of the
current workload, and the spare pool) and gets ``Decision``s back. No I/O, no clock: the
live loop (``services.control.loop``) and the simulator (``bench.sim`` control hook) run
this same code.

Signals (§1.3): mean E2E and the TTFT share T_p / E2E of the group.
- "E2E up" is E2E above the group's reference by ``e2e_up`` (or more than ``fail_up`` of
  the period's requests failing: deadline misses are TTFT misses). The reference is the
  E2E the group holds when calm (a moving average) and is re-taken after every change.
- Direction: TTFT share up against its reference adds prefill; down adds decode. Within
  ``share_band`` (absolute) and ``share_rel`` (relative) of the reference, the Eq. 1
  bottleneck decides, if there is a profile.
- Without a profile the controller only reacts to change: a group that starts out of
  balance has no reference to be "up" from. With one, a first look that already queues
  (E2E above Eq. 1's no-wait E2E) is judged against the model.
- With a profile and the group's arrival rate, a rise is ignored while Eq. 1 says the
  split carries the traffic with ``headroom`` (a longer workload has a longer E2E).
- Size (gradual): with a profile, move toward Eq. 1's best split for the group's size,
  at most ``max_step_frac`` of the group per period (at least 1); without one, 1.
  Where the signal and the model disagree, the measurement wins, one instance at a time.
- After a change the group waits ``cooldown`` periods, then judges it on E2E: a step
  that cut E2E by ``improve`` or more is followed by another in the same direction
  while the model (if any) still points there (hill climbing); one that made E2E worse
  by ``e2e_up`` is reverted, and the group then holds (``hold`` periods ignore triggers
  weaker than twice ``e2e_up``); anything between is the new normal. This is the
  hysteresis: no change without a clear rise, no reversal without a clear loss. A loss
  is not reverted when Eq. 1 says the change added capacity: right after an overload the
  E2E still carries the backlog that triggered the change.
- The first ``warmup`` periods with evidence only take the reference (a group filling up
  has a low E2E that is no norm).

Where instances come from:
- fixed total: switch one of the group's other role, if that role keeps >= 2 and (with a
  profile) the switch raises the group's capacity; otherwise move one from a donor group
  that is calm, not changing, and keeps ``headroom`` over its traffic without it. A group
  whose traffic exceeds what any split of its size carries (Eq. 1) is short of
  instances: donors first, as many as its deficit in the role (within the step cap).
- spare pool (``spare=True``): borrow idle instances first (up to ``max_borrow`` per
  group); release a borrowed one after ``release_after`` calm periods when (with a
  profile) the group keeps ``headroom`` without it.

No single point of failure: no action takes a role below 2 instances, and a role that
has fewer than 2 (a group of 2 or 3) never gives one up.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from services.control.actuator import Decision, Kind
from services.control.perfmodel import DECODE, PREFILL, GroupProfile, best_split, required

FLOOR = 2  # instances a role keeps (no single point of failure)


@dataclass(frozen=True)
class ControllerConfig:
    e2e_up: float = 0.15  # E2E above reference by this fraction: "E2E up"
    fail_up: float = 0.05  # failed share of a period's requests that also counts as "up"
    share_band: float = 0.03  # TTFT-share change (absolute) that picks a side ...
    share_rel: float = 0.25  # ... or relative to the reference share (small shares)
    improve: float = 0.05  # a change that cut E2E by this fraction helped: keep going
    cooldown: int = 1  # periods after a change before it is judged
    hold: int = 3  # periods after a revert that ignore weak triggers
    max_step_frac: float = 0.25  # of the group's instances moved in one period (>= 1)
    min_requests: int = 10  # fewer requests ended in a period: no evidence
    ewma: float = 0.3  # the reference's moving-average weight in calm periods
    spare: bool = False  # borrow from the spare pool (else: fixed total)
    max_borrow: int = 4  # spares a group may hold
    release_after: int = 3  # calm periods before a borrowed instance is released
    headroom: float = 1.2  # capacity over traffic a donor or a release must keep
    short_headroom: float = 1.1  # a group with less (at its best split) is short
    short_confirm: int = 1  # periods in a row a group must be short before it takes more
    cross_group: bool = True  # fixed total: move instances between groups
    warmup: int = 2  # periods of evidence before the reference is trusted (fill-up)


@dataclass(frozen=True)
class Obs:
    """What ended in one group during one period."""

    requests: int  # ended (ok or failed)
    failed: int
    mean_e2e_ms: float  # over the ones that ended ok
    ttft_share: float  # mean TTFT / E2E over the ones that ended ok
    arrival_rps: float = 0.0
    prefill_busy: float = math.nan  # utilisation 0..1, when known
    decode_busy: float = math.nan


@dataclass(frozen=True)
class Member:
    instance_id: str
    in_flight: int = 0


@dataclass(frozen=True)
class GroupView:
    group: str
    obs: Obs
    prefills: tuple[Member, ...]
    decodes: tuple[Member, ...]
    changing: int = 0  # members mid-switch (draining, loading): wait for them
    profile: GroupProfile | None = None  # Eq. 1's inputs for the current workload

    @property
    def n_p(self) -> int:
        return len(self.prefills)

    @property
    def n_d(self) -> int:
        return len(self.decodes)

    def members(self, role: str) -> tuple[Member, ...]:
        return self.prefills if role == PREFILL else self.decodes


@dataclass(frozen=True)
class FleetView:
    groups: tuple[GroupView, ...]
    spares: tuple[str, ...] = ()  # idle instance ids (local processes)
    anonymous_spares: int = 0  # scale-only actuators: replicas that may still be added


@dataclass
class Pending:
    direction: int  # +1: prefill was added, -1: decode was added
    pre_e2e: float
    revert: bool = False
    model: bool = False  # sized by Eq. 1 for a short group: not judged on E2E


@dataclass
class GroupState:
    ref_e2e: float = 0.0
    ref_share: float = 0.0
    seen: int = 0  # periods with evidence
    short_streak: int = 0  # periods in a row Eq. 1 found the group short
    cooldown: int = 0
    hold: int = 0
    calm: int = 0
    pending: Pending | None = None
    borrowed: dict[str, int] = field(default_factory=dict)
    last: str = ""  # the last decision or judgement, for logs and plots


@dataclass(frozen=True)
class _Want:
    group: str
    role: str  # the role to add
    count: int
    reason: str
    pending: Pending


def _other(role: str) -> str:
    return DECODE if role == PREFILL else PREFILL


def _role_of(direction: int) -> str:
    return PREFILL if direction > 0 else DECODE


def _quietest(members: tuple[Member, ...], k: int) -> list[Member]:
    """The ``k`` members with the least in flight (quickest to drain), ties by id."""
    return sorted(members, key=lambda m: (m.in_flight, m.instance_id))[:k]


class RatioController:
    """One state per group; ``decide`` once per control period."""

    def __init__(self, cfg: ControllerConfig | None = None) -> None:
        self.cfg = cfg or ControllerConfig()
        self.state: dict[str, GroupState] = {}

    # -- the period --------------------------------------------------------------------
    def decide(self, view: FleetView) -> list[Decision]:
        wants: list[_Want] = []
        releases: list[Decision] = []
        calm: set[str] = set()
        for gv in sorted(view.groups, key=lambda g: g.group):
            st = self.state.setdefault(gv.group, GroupState())
            want = self._judge(gv, st)
            if isinstance(want, tuple):
                wants.extend(want)
            elif isinstance(want, _Want):
                wants.append(want)
            elif isinstance(want, Decision):
                releases.append(want)
            elif want is None and not gv.changing and st.cooldown == 0 and st.pending is None:
                calm.add(gv.group)
        by_name = {g.group: g for g in view.groups}
        spares = list(view.spares)
        anonymous = view.anonymous_spares
        touched: set[str] = {w.group for w in wants}  # receivers never give
        given: set[str] = set()  # instances moved this period
        out: list[Decision] = list(releases)
        for w in wants:
            gv, st = by_name[w.group], self.state[w.group]
            got: list[Decision] = []
            if self.cfg.spare:
                room = max(0, self.cfg.max_borrow - sum(st.borrowed.values()))
                k = min(w.count, room)
                for _ in range(k):
                    if spares:
                        got.append(Decision(Kind.BORROW, w.group, w.role, spares.pop(0),
                                            reason=w.reason))
                    elif anonymous > 0:
                        anonymous -= 1
                        got.append(Decision(Kind.BORROW, w.group, w.role, reason=w.reason))
                for _ in got:
                    st.borrowed[w.role] = st.borrowed.get(w.role, 0) + 1
            # A group whose traffic exceeds what its best split carries (Eq. 1) is short
            # of instances, not of balance: take from calm groups first (§1.3: "rebuild
            # some groups by moving instances between groups"), then rebalance.
            short = self._deficit(gv, w.role) > 0
            for source in ("donors", "switch") if short else ("switch", "donors"):
                need = w.count - len(got)
                if need <= 0:
                    break
                if source == "switch":
                    got += self._switch(gv, w, need)
                elif self.cfg.cross_group and not self.cfg.spare:
                    for donor in self._donors(by_name, calm - touched, w, need, given):
                        got.append(donor)
                        given.add(donor.instance_id)
                        self.state[donor.from_group].cooldown = self.cfg.cooldown
                        self.state[donor.from_group].ref_e2e = 0.0  # re-taken after
                        self.state[donor.from_group].last = f"gave {donor.instance_id}"
            if got:
                st.pending = w.pending
                st.cooldown = self.cfg.cooldown
                st.calm = 0
                gained = f"+{len(got)} {w.role}"
                st.last = f"{st.last}, {gained}" if w.pending.model and st.last.startswith(
                    w.reason) else f"{w.reason}: {gained}"
                if w.pending.revert:
                    st.hold = self.cfg.hold
            else:
                st.last = f"{w.reason}: no instance to add"
            out.extend(got)
        return out

    # -- one group's judgement ---------------------------------------------------------
    def _judge(self, gv: GroupView, st: GroupState
               ) -> _Want | tuple[_Want, ...] | Decision | None:
        cfg, o = self.cfg, gv.obs
        if gv.changing:
            return None  # the last change is still under way: judge nothing yet
        if o.requests - o.failed <= 0 or o.requests < cfg.min_requests \
                or not math.isfinite(o.mean_e2e_ms):
            return None
        e2e, share = o.mean_e2e_ms, o.ttft_share
        fail_rate = o.failed / o.requests
        prof = gv.profile
        st.seen += 1
        if st.seen <= cfg.warmup:  # the group is still filling up: its E2E is not a norm
            st.ref_e2e = 0.0
        if st.ref_e2e <= 0:
            st.ref_e2e, st.ref_share = e2e, share
            if prof is not None and e2e > prof.e2e_ms * (1 + cfg.e2e_up):
                # Already queueing at the first look: judge against the no-wait model.
                st.ref_e2e, st.ref_share = prof.e2e_ms, prof.ttft_share
        if st.seen <= cfg.warmup:
            return None
        if st.cooldown > 0:
            st.cooldown -= 1
            return None
        if st.pending is not None and st.pending.model:
            st.pending = None
            st.ref_e2e, st.ref_share = e2e, share  # sized by the model: the new normal
        if st.pending is not None:
            p, st.pending = st.pending, None
            gain = 1.0 - e2e / max(p.pre_e2e, 1e-9)
            if not p.revert and gain >= cfg.improve and self._model_allows(gv, p.direction):
                st.last = f"helped {100 * gain:.0f}%: continue"
                return self._want(gv, p.direction, "continue", e2e, continue_=True)
            if not p.revert and gain <= -cfg.e2e_up:
                if self._model_backs(gv, p.direction):
                    # Eq. 1 says the change added capacity: the rise is the backlog of
                    # the overload that triggered it, still draining. Keep the change.
                    st.ref_e2e, st.ref_share = e2e, share
                    st.last = f"E2E {-100 * gain:.0f}% worse, model backs the change: keep"
                    return None
                st.last = f"hurt {-100 * gain:.0f}%: revert"
                return self._want(gv, -p.direction, "revert", e2e, revert=True)
            st.ref_e2e, st.ref_share = e2e, share  # the new normal
            st.last = f"settled ({100 * gain:+.0f}%)"
            return None
        short = self._short(gv)
        st.short_streak = st.short_streak + 1 if short else 0
        if short and st.short_streak >= cfg.short_confirm:
            return short
        up = e2e > st.ref_e2e * (1 + cfg.e2e_up) or fail_rate > cfg.fail_up
        if not up:
            st.ref_e2e += cfg.ewma * (e2e - st.ref_e2e)
            st.ref_share += cfg.ewma * (share - st.ref_share)
            st.calm += 1
            st.hold = max(0, st.hold - 1)
            return self._maybe_release(gv, st)
        if prof is not None and o.arrival_rps > 0 and fail_rate <= cfg.fail_up and \
                prof.capacity(gv.n_p, gv.n_d) >= cfg.headroom * o.arrival_rps:
            # Eq. 1 says this split carries the traffic with headroom: the rise is the
            # workload's own (longer answers take longer), not a mismatch.
            st.ref_e2e += cfg.ewma * (e2e - st.ref_e2e)
            st.ref_share += cfg.ewma * (share - st.ref_share)
            st.last = "E2E up, Eq. 1 has headroom: hold"
            return None
        st.calm = 0
        if st.hold > 0 and e2e <= st.ref_e2e * (1 + 2 * cfg.e2e_up) and fail_rate <= cfg.fail_up:
            st.hold -= 1
            return None
        d_share = share - st.ref_share
        rel = d_share / st.ref_share if st.ref_share > 0 else 0.0
        if fail_rate > cfg.fail_up or d_share > cfg.share_band or rel > cfg.share_rel:
            direction = +1
        elif d_share < -cfg.share_band or rel < -cfg.share_rel:
            direction = -1
        elif prof is not None and prof.bottleneck(gv.n_p, gv.n_d) in (PREFILL, DECODE):
            direction = +1 if prof.bottleneck(gv.n_p, gv.n_d) == PREFILL else -1
        else:
            st.last = "E2E up, no side: hold"
            return None
        why = (f"E2E {e2e:.0f} ms > ref {st.ref_e2e:.0f}, share {share:.2f} "
               f"({d_share:+.2f}){', failures' if fail_rate > cfg.fail_up else ''}")
        return self._want(gv, direction, why, e2e)

    def _short(self, gv: GroupView) -> tuple[_Want, ...]:
        """Eq. 1's trigger (the paper's "from profiling"): the group's traffic exceeds
        what any split of its size carries, and instances can come from elsewhere (spare
        pool or calm groups). Wants each role's deficit, within the step cap. Judged by
        the model, not by E2E: no hill-climb follows."""
        if not (self.cfg.spare or self.cfg.cross_group):
            return ()
        cap = max(1, int(self.cfg.max_step_frac * (gv.n_p + gv.n_d)))
        out = []
        for role in (PREFILL, DECODE):
            k = min(cap, self._deficit(gv, role))
            if k > 0:
                d = +1 if role == PREFILL else -1
                out.append(_Want(gv.group, role, k, f"traffic {gv.obs.arrival_rps:.1f}/s > "
                                 f"Eq. 1 capacity of {gv.n_p + gv.n_d}",
                                 Pending(d, gv.obs.mean_e2e_ms, model=True)))
        return tuple(out)

    def _deficit(self, gv: GroupView, role: str) -> int:
        """Instances of ``role`` the group lacks to carry its traffic at any split of its
        size (Eq. 1; 0 without a profile or when some split of its size suffices)."""
        prof, rate = gv.profile, gv.obs.arrival_rps
        total = gv.n_p + gv.n_d
        want = rate * self.cfg.short_headroom
        if prof is None or rate <= 0 or total < 2 or best_split(prof, total).capacity >= want:
            return 0
        need = required(prof, want, floor=FLOOR)
        return max(0, (need.n_p - gv.n_p) if role == PREFILL else (need.n_d - gv.n_d))

    def _step_size(self, gv: GroupView, direction: int) -> int:
        total = gv.n_p + gv.n_d
        cap = max(1, int(self.cfg.max_step_frac * total))
        deficit = self._deficit(gv, _role_of(direction))
        if deficit > 0:
            return min(cap, deficit)
        if gv.profile is None or total < 2:
            return 1
        gap = best_split(gv.profile, total).n_p - gv.n_p
        return min(cap, abs(gap)) if gap * direction > 0 else 1

    def _model_allows(self, gv: GroupView, direction: int) -> bool:
        """Continue a climb only while Eq. 1 (if known) still points that way."""
        if gv.profile is None:
            return True
        return (best_split(gv.profile, gv.n_p + gv.n_d).n_p - gv.n_p) * direction > 0

    def _model_backs(self, gv: GroupView, direction: int) -> bool:
        """The last change (one step of ``direction`` to reach the current split) raised
        Eq. 1's capacity."""
        if gv.profile is None:
            return False
        n_p, n_d = gv.n_p - direction, gv.n_d + direction
        if n_p < 1 or n_d < 1:
            return True
        return gv.profile.capacity(gv.n_p, gv.n_d) >= gv.profile.capacity(n_p, n_d)

    def _want(self, gv: GroupView, direction: int, reason: str, e2e: float,
              continue_: bool = False, revert: bool = False) -> _Want:
        k = 1 if revert else self._step_size(gv, direction)
        return _Want(gv.group, _role_of(direction), k, reason,
                     Pending(direction, e2e, revert=revert))

    # -- where instances come from -----------------------------------------------------
    def _switch(self, gv: GroupView, w: _Want, need: int) -> list[Decision]:
        """Switch up to ``need`` of the group's other role, keeping it at >= FLOOR and
        (with a profile) only while each switch raises the group's capacity."""
        src = _other(w.role)
        give = max(0, len(gv.members(src)) - FLOOR)
        if self._deficit(gv, src) > 0:
            give = 0  # the other role is short as well: switching only moves the gap
        k = min(need, give)
        if gv.profile is not None and not w.pending.revert:
            # The first switch may cost up to 10% of modelled capacity (the model is at
            # best next to the measured optimum, and the signal is measured); more only
            # while each raises it. A switch the model says loses more than that means
            # both roles are short: an instance from elsewhere is what helps.
            n_p, n_d, ok = gv.n_p, gv.n_d, 0
            for _ in range(k):
                n_p2, n_d2 = (n_p + 1, n_d - 1) if w.role == PREFILL else (n_p - 1, n_d + 1)
                now, then = gv.profile.capacity(n_p, n_d), gv.profile.capacity(n_p2, n_d2)
                if then < (0.9 * now if ok == 0 else now * (1 + 1e-9)):
                    break
                n_p, n_d, ok = n_p2, n_d2, ok + 1
            k = ok
        return [Decision(Kind.SWITCH, gv.group, w.role, m.instance_id, gv.group, src, w.reason)
                for m in _quietest(gv.members(src), k)]

    def _donors(self, by_name: dict[str, GroupView], calm: set[str], w: _Want, need: int,
                given: set[str]) -> list[Decision]:
        """Up to ``need`` instances other groups can give: calm groups (calmest first),
        each its slackest role above the floor, while (with a profile) it keeps
        ``headroom`` over its traffic."""
        out: list[Decision] = []
        for name in sorted(calm, key=lambda g: (self._pressure(by_name[g]), g)):
            gv = by_name[name]
            left = {r: [m for m in _quietest(gv.members(r), len(gv.members(r)))
                        if m.instance_id not in given] for r in (PREFILL, DECODE)}
            while len(out) < need:
                role = self._slack_role(gv, len(left[PREFILL]), len(left[DECODE]))
                if role is None:
                    break
                n_p = len(left[PREFILL]) - (role == PREFILL)
                n_d = len(left[DECODE]) - (role == DECODE)
                prof = gv.profile
                if prof is not None and gv.obs.arrival_rps > 0 and \
                        prof.capacity(n_p, n_d) < self.cfg.headroom * gv.obs.arrival_rps:
                    break
                m = left[role].pop(0)
                out.append(Decision(Kind.MOVE, w.group, w.role, m.instance_id, name, role,
                                    f"{w.reason}; donor {name}"))
            if len(out) >= need:
                break
        return out

    def _pressure(self, gv: GroupView) -> float:
        st = self.state.get(gv.group)
        if gv.obs.requests == 0:
            return 0.0
        if st is None or st.ref_e2e <= 0:
            return 1.0
        return gv.obs.mean_e2e_ms / st.ref_e2e

    def _slack_role(self, gv: GroupView, n_p: int, n_d: int) -> str | None:
        """The role a group of ``n_p`` + ``n_d`` can best spare, if one is above the floor."""
        can = [r for r, n in ((PREFILL, n_p), (DECODE, n_d)) if n > FLOOR]
        if len(can) <= 1:
            return can[0] if can else None
        if gv.profile is not None:
            pr = gv.profile.u_p * gv.profile.prefill_rate(n_p - 1)
            dr = gv.profile.decode_rate(n_d - 1)
            return PREFILL if pr >= dr else DECODE
        pb, db = gv.obs.prefill_busy, gv.obs.decode_busy
        if math.isfinite(pb) and math.isfinite(db):
            return PREFILL if pb <= db else DECODE
        return PREFILL if n_p >= n_d else DECODE

    def _maybe_release(self, gv: GroupView, st: GroupState) -> Decision | None:
        if not self.cfg.spare or st.calm < self.cfg.release_after:
            return None
        for role in sorted(st.borrowed, key=lambda r: -st.borrowed[r]):
            if st.borrowed[role] <= 0 or len(gv.members(role)) <= FLOOR:
                continue
            prof = gv.profile
            n_p, n_d = gv.n_p - (role == PREFILL), gv.n_d - (role == DECODE)
            if prof is not None and prof.capacity(n_p, n_d) < \
                    self.cfg.headroom * gv.obs.arrival_rps:
                continue
            if prof is None:
                busy = gv.obs.prefill_busy if role == PREFILL else gv.obs.decode_busy
                if not (math.isfinite(busy) and busy < 0.5):
                    continue
            st.borrowed[role] -= 1
            st.calm = 0
            st.cooldown = self.cfg.cooldown
            st.ref_e2e = 0.0  # re-taken after the release settles
            m = _quietest(gv.members(role), 1)[0]
            st.last = f"calm {self.cfg.release_after} periods: release {m.instance_id}"
            return Decision(Kind.RELEASE, gv.group, role, m.instance_id, reason=st.last)
        return None

    # -- persistence (a successor leader resumes the group states) ----------------------
    def snapshot(self) -> dict[str, dict[str, object]]:
        return {g: asdict(s) for g, s in self.state.items()}

    def restore(self, raw: dict[str, dict[str, object]]) -> None:
        self.state = {}
        for g, d in raw.items():
            p = d.get("pending")
            pending = Pending(**p) if isinstance(p, dict) else None
            self.state[g] = GroupState(**{**d, "pending": pending})  # type: ignore[arg-type]
