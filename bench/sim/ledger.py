"""What the invariant tests check, recorded by ``Simulator(audit=True)`` (BLIS-style).

- the clock: no event runs before the previous one;
- KV: every request's blocks have exactly one owner at a time (a prefill's reservation
  in the kvstore, then a decode), and at the end none is held; transfers (the prefill's
  push, the decode's fetch) started = completed + aborted;
- causality: arrival <= prefill start <= prefill done <= decode start <= end, and the
  first token before the end, per request;
- pool exclusivity: an instance is in at most one group and one role at a time, and a
  request's prefill and decode were members of its group, in that role, when used.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, field


class InvariantError(AssertionError):
    pass


@dataclass
class Audit:
    clock_violations: int = 0
    owner: dict[int, str] = field(default_factory=dict)  # request -> holder of its KV blocks
    double_owned: int = 0
    transfers: Counter[str] = field(default_factory=Counter)  # "push:start", "fetch:abort"...
    times: dict[int, dict[str, float]] = field(default_factory=dict)
    ends: Counter[str] = field(default_factory=Counter)
    ended: set[int] = field(default_factory=set)
    membership: dict[str, tuple[str, str]] = field(default_factory=dict)  # id -> (group, role)
    membership_log: list[tuple[float, str, str, str, bool]] = field(default_factory=list)
    pool_violations: list[str] = field(default_factory=list)

    def clock(self, t: float, now: float) -> None:
        if t < now:
            self.clock_violations += 1

    def arrive(self, now: float, idx: int) -> None:
        self.times[idx] = {"arrival": now}

    def member(self, now: float, iid: str, group: str, role: str, joined: bool) -> None:
        self.membership_log.append((now, iid, group, role, joined))
        if joined:
            if iid in self.membership:
                self.pool_violations.append(f"{iid} joined {group}/{role} while in "
                                            f"{self.membership[iid]}")
            self.membership[iid] = (group, role)
        else:
            self.membership.pop(iid, None)

    def _used(self, iid: str, group: str, role: str, idx: int) -> None:
        if self.membership.get(iid) != (group, role):
            # A draining instance still finishes its work: it left routing, not the group.
            draining = [e for e in self.membership_log if e[1] == iid and e[2] == group
                        and e[3] == role]
            if not draining:
                self.pool_violations.append(f"request {idx} used {iid} as {role} of {group}, "
                                            f"which it never was")

    def first_token(self, t: float, idx: int, iid: str, group: str, started: float,
                    done: float) -> None:
        ts = self.times[idx]
        ts["first_token"], ts["prefill_start"], ts["prefill_done"] = t, started, done
        self._used(iid, group, "prefill", idx)

    def decode_start(self, t: float, idx: int, iid: str, group: str) -> None:
        self.times[idx]["decode_start"] = t
        self._used(iid, group, "decode", idx)

    def kv_reserve(self, now: float, idx: int, prefill: str) -> None:
        if idx in self.owner:
            self.double_owned += 1
        self.owner[idx] = "store"

    def kv_move(self, now: float, idx: int, src: str, dst: str) -> None:
        if self.owner.get(idx) != src:
            self.double_owned += 1
        self.owner[idx] = dst

    def kv_free(self, now: float, idx: int, holder: str) -> None:
        have = self.owner.pop(idx, None)
        if have is None or (holder != "store" and have != holder and have != "store"):
            self.double_owned += 1

    def transfer(self, idx: int, hop: str, what: str) -> None:
        self.transfers[f"{hop}:{what}"] += 1

    def end(self, now: float, idx: int, status: str, was: int) -> None:
        if idx in self.ended:
            raise InvariantError(f"request {idx} ended twice")
        self.ended.add(idx)
        self.ends[status] += 1
        self.times.setdefault(idx, {})["end"] = now

    # -- checks ---------------------------------------------------------------------------
    def check(self, admitted: int) -> None:
        errors = []
        if self.clock_violations:
            errors.append(f"clock went back {self.clock_violations} times")
        if sum(self.ends.values()) != admitted:
            errors.append(f"admitted {admitted} != ended {dict(self.ends)}")
        if self.owner:
            errors.append(f"{len(self.owner)} requests still hold KV: "
                          f"{list(self.owner.items())[:5]}")
        if self.double_owned:
            errors.append(f"{self.double_owned} KV ownership violations")
        for hop in ("push", "fetch"):
            t = self.transfers
            if t[f"{hop}:start"] != t[f"{hop}:done"] + t[f"{hop}:abort"]:
                errors.append(f"{hop}: started {t[hop + ':start']} != done {t[hop + ':done']}"
                              f" + aborted {t[hop + ':abort']}")
        for idx, ts in self.times.items():
            seq = [ts[k] for k in ("arrival", "prefill_start", "prefill_done", "decode_start",
                                   "end") if k in ts]
            late_first = "first_token" in ts and ts["first_token"] > ts["end"] + 1e-9
            if late_first or any(b < a - 1e-9 for a, b in itertools.pairwise(seq)):
                errors.append(f"request {idx} out of order: {ts}")
                break
        errors.extend(self.pool_violations[:5])
        if errors:
            raise InvariantError("; ".join(errors))
