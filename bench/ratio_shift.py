"""Traffic shift: the ratio controller (``services.control``) against static ratios.

Two scenario groups of ``--instances`` each, open loop (Poisson arrivals per group),
in the simulator with the controller in its control hook (the same pure code the live
loop runs). Mid-run (``--shift-s``) the workload changes:
- ``output``: group g0's answers double (chat -> chat-long; the §1.3 "Td+" case);
- ``mix``: traffic moves from g1 to g0 (g0 x ``--mix-factor``, g1 the rest), with a
  fixed total: instances must move between groups;
- ``burst``: g0's traffic x ``--mix-factor`` for ``--burst-s``, then back; compared:
  static, the fixed-total controller, and the controller with a spare pool (the
  traffic-free group g2), which borrows for the burst and releases afterwards.

Compared, over the same arrivals:
- ``static-initial``: the split that was best before the shift, kept;
- ``static-best``: the split Eq. 1 gives for the *new* workload, from the start (the
  best static ratio for it; for ``mix``, Eq. 1's allocation of the fleet);
- ``controller``: starts at ``static-initial`` and adjusts every ``--period-s``.

Target: within 3 control periods after the shift the controller reaches
>= 90% of ``static-best``'s goodput (the per-period mean after the shift), and no
request is lost to a switch (drains finish in-flight work; failures are counted).

  python bench/ratio_shift.py --quick
  python bench/ratio_shift.py --scenario output --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ratio_common import (
    ArrivedLengths,
    Item,
    SimControl,
    Slo,
    predicted,
    workload,
)
from bench.sim import hook
from bench.sim.core import Simulator
from bench.sim.model import Result, SimConfig, SimRequest
from services.control.controller import ControllerConfig
from services.control.perfmodel import Deployment, Workload, allocate, best_split, effective_b_d
from services.engine.mock import LatencyModel


@dataclass
class Run:
    scenario: str
    run: int
    arm: str
    goodput: list[float]  # per period, req/s meeting both SLOs, all groups
    goodput_g0: list[float]  # the same, group g0 (the one whose workload changes)
    ratio: list[list[int]]  # per period: [n_p g0, n_d g0, n_p g1, n_d g1]
    failed: int
    requests: int
    periods_to_90: int = -1  # controller only: periods after the shift to >= 90%
    moves: int = 0
    log: list[str] = field(default_factory=list)


def arrivals(rates: list[tuple[float, float]], items: dict[str, list[Item]], shift_ms: float,
             end_ms: float, seed: int, scenario: str,
             back_ms: float = float("inf")) -> list[SimRequest]:
    """Poisson arrivals per group; rates (before, after) the shift, and before again from
    ``back_ms``; g0's items switch to the shifted workload at the shift for ``output``."""
    import random

    out: list[SimRequest] = []
    for g, (before, after) in enumerate(rates):
        rng = random.Random(f"shift/{seed}/{g}")
        t, k = 0.0, 0
        while True:
            rate = after if shift_ms <= t < back_ms else before
            t += rng.expovariate(rate) * 1000.0
            if t >= end_ms:
                break
            key = "after" if (scenario == "output" and g == 0 and t >= shift_ms) else "before"
            it = items[key][k % len(items[key])]
            k += 1
            out.append(SimRequest(t, it.prompt_len, it.output_len, g, it.hash_ids))
    out.sort(key=lambda r: (r.arrival_ms, r.group))
    return out


def per_period(res: list[Result], reqs: list[SimRequest], slo: Slo, period_ms: float,
               periods: int, group: int | None = None) -> list[float]:
    """SLO-meeting completions per second in each period (of one group, or all)."""
    met = [0] * periods
    for r, q in zip(res, reqs, strict=True):
        k = int(r.end_ms // period_ms)
        if k < periods and (group is None or q.group == group) and slo.met(r, q.output_len):
            met[k] += 1
    return [m * 1000.0 / period_ms for m in met]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--scenario", choices=("output", "mix", "burst", "both"), default="both",
                    help="both: output and mix; burst: g0's traffic x --mix-factor for "
                         "--burst-s, then back, with a spare pool (borrow, then release)")
    ap.add_argument("--burst-s", type=float, default=60.0)
    ap.add_argument("--profile", default="scaled-gpu")
    ap.add_argument("--instances", type=int, default=24, help="per group")
    ap.add_argument("--decode-slots", type=int, default=64)
    ap.add_argument("--kv-pool-tokens", type=int, default=65536)
    ap.add_argument("--load", type=float, default=0.6,
                    help="output: the rate lies this far from the old split's modelled "
                         "capacity for the new workload (0) to the best split's (1); mix: "
                         "each group's share of its modelled capacity before the shift")
    ap.add_argument("--mix-factor", type=float, default=1.5)
    ap.add_argument("--mix-load", type=float, default=0.8)
    ap.add_argument("--period-s", type=float, default=10.0)
    ap.add_argument("--switch-s", type=float, default=2.0, help="a role switch's reload time")
    ap.add_argument("--shift-s", type=float, default=60.0)
    ap.add_argument("--duration-s", type=float, default=200.0)
    ap.add_argument("--slo-factor", type=float, default=8.0)
    ap.add_argument("--slo-floor-ms", type=float, default=300.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=60.0)
    ap.add_argument("--no-model", action="store_true", help="controller without Eq. 1")
    ap.add_argument("--policy", default="forward", help="prefill scheduling policy")
    ap.add_argument("--prefill-util", type=float, default=0.7,
                    help="u_p: the prefill utilisation Eq. 1 plans for (TTFT headroom)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out-dir", default="bench/out")
    ap.add_argument("--json")
    ap.add_argument("--verbose", action="store_true", help="print the controller's log")
    args = ap.parse_args()
    if args.quick:
        args.duration_s = min(args.duration_s, 140.0)
    from services.model.profile import profile_path

    lat = LatencyModel.from_profile(json.loads(profile_path(args.profile).read_text()))
    slo = Slo(args.slo_factor, args.slo_floor_ms, args.tpot_slo_ms)
    scenarios = ["output", "mix"] if args.scenario == "both" else [args.scenario]
    runs: list[Run] = []
    for scenario in scenarios:
        for run in range(args.runs):
            runs += one(scenario, run, lat, slo, args)
    report(runs, args)
    if args.verbose:
        for r in runs:
            if r.arm == "controller":
                print(f"-- {r.scenario} run {r.run} controller log:")
                print("\n".join(r.log))
    paths = plot(runs, args, Path(args.out_dir))
    for p in paths:
        print(f"plot: {p}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1))
    return 0


def one(scenario: str, run: int, lat: LatencyModel, slo: Slo, args: argparse.Namespace
        ) -> list[Run]:
    n = args.instances
    before = workload("chat", 3000, seed=run)
    after = workload("chat-long", 3000, seed=run) if scenario == "output" else before
    base = Deployment(prefill_slots=1, decode_slots=args.decode_slots,
                      kv_pool_tokens=args.kv_pool_tokens)
    # Eq. 1's b_d for the run: what the KV room allows for the longer of the two workloads
    # (the simulator admits each request by its own length).
    b_d = min(effective_b_d(lat, Workload.from_requests(
        lat, [(i.prompt_len, i.output_len) for i in w]), base) for w in (before, after))
    dep = Deployment(prefill_slots=1, decode_slots=b_d, prefill_util=args.prefill_util)
    p_before, p_after = predicted(lat, before, dep), predicted(lat, after, dep)
    init = best_split(p_before, n)
    if scenario == "output":
        best_after = best_split(p_after, n)
        # Between what the old split carries of the new workload and what the best one
        # does (Eq. 1), so that the old split is overloaded and the best is not.
        init_after = p_after.capacity(init.n_p, init.n_d)
        rate = init_after + args.load * (best_after.capacity - init_after)
        print(f"output: Eq. 1 P{init.n_p}/D{init.n_d} carries {init_after:.1f} req/s of the "
              f"new workload, the best P{best_after.n_p}/D{best_after.n_d} "
              f"{best_after.capacity:.1f}; rate {rate:.1f} req/s per group")
        rates = [(rate, rate), (rate, rate)]
        init_splits = [(init.n_p, init.n_d)] * 2
        best_splits = [(best_after.n_p, best_after.n_d), (init.n_p, init.n_d)]
    elif scenario == "burst":
        r = args.mix_load * init.capacity
        rates = [(r, r * args.mix_factor), (r, r)]
        init_splits = best_splits = [(init.n_p, init.n_d)] * 2
    else:
        total_rate = 2 * args.mix_load * init.capacity
        r0 = total_rate * args.mix_factor / 2
        rates = [(total_rate / 2, r0), (total_rate / 2, total_rate - r0)]
        alloc = allocate({"g0": (p_before, rates[0][1]), "g1": (p_before, rates[1][1])}, 2 * n)
        init_splits = [(init.n_p, init.n_d)] * 2
        best_splits = [(alloc["g0"].n_p, alloc["g0"].n_d), (alloc["g1"].n_p, alloc["g1"].n_d)]
    period_ms, shift_ms = args.period_s * 1000, args.shift_s * 1000
    end_ms = args.duration_s * 1000
    periods = int(end_ms // period_ms)
    back_ms = shift_ms + args.burst_s * 1000 if scenario == "burst" else float("inf")
    reqs = arrivals(rates, {"before": before, "after": after}, shift_ms, end_ms, run, scenario,
                    back_ms)
    out: list[Run] = []
    arms = (("static-initial", init_splits), ("controller", init_splits),
            ("controller+spares", init_splits)) if scenario == "burst" else \
        (("static-initial", init_splits), ("static-best", best_splits),
         ("controller", init_splits))
    for arm, splits in arms:
        # Groups may differ in size (mix: Eq. 1's allocation); the simulator starts all
        # alike, so the largest sets the start and a third, traffic-free group g2 holds
        # the surplus.
        size = max(p + d for p, d in splits)
        cfg = SimConfig(policy=args.policy, groups=3, prefills_per_group=size // 2,
                        decodes_per_group=size - size // 2,
                        decode_slots=args.decode_slots, decode_pool_tokens=args.kv_pool_tokens,
                        slo_factor=slo.factor, slo_floor_ms=slo.floor_ms,
                        control_period_ms=period_ms, switch_ms=args.switch_s * 1000, seed=run)
        ctl = None
        if arm.startswith("controller"):
            names = {0: "g0", 1: "g1", 2: "g2"}
            # controller+spares: the traffic-free group g2 is the spare pool to borrow from
            ccfg = ControllerConfig(spare=arm == "controller+spares", max_borrow=n // 3)
            ctl = SimControl(lat, dep, ccfg, ArrivedLengths(reqs, names), pool="g2",
                             use_model=not args.no_model)
        gp, gp0, ratio, failed, moves = simulate_sized(cfg, lat, reqs, splits, ctl, slo,
                                                       periods)
        r = Run(scenario, run, arm, gp, gp0, ratio, failed, len(reqs), moves=moves,
                log=[f"{t / 1000:.0f}s {g} P{p}/D{d} {why}" for t, g, p, d, why in
                     (ctl.log if ctl else []) if why])
        out.append(r)
    if scenario == "burst":
        return out
    # The target compares the group whose workload changed (output) or the whole fleet
    # (mix), over the periods after the shift that arrivals still fill.
    best = next(r for r in out if r.arm == "static-best")
    ctl_run = out[-1]
    k0 = int(shift_ms // period_ms)

    def series(r: Run) -> list[float]:
        return r.goodput_g0 if scenario == "output" else r.goodput

    target = statistics.fmean(series(best)[k0 + 1: periods - 1])
    got = series(ctl_run)
    for k in range(k0, periods - 1):
        if all(g >= 0.9 * target for g in got[k: periods - 1]):
            ctl_run.periods_to_90 = k - k0
            break
    return out


def simulate_sized(cfg: SimConfig, lat: LatencyModel, reqs: list[SimRequest],
                   splits: list[tuple[int, int]], ctl: SimControl | None, slo: Slo,
                   periods: int) -> tuple[list[float], list[float], list[list[int]], int, int]:
    """One run with groups g0, g1 laid out as ``splits`` at t = 0 (the simulator starts
    every group alike: surplus goes to the traffic-free group g2, which is also the
    controller's spare pool if it uses one), then the controller, if any, every period."""
    log: list[list[int]] = []

    def hook_fn(snaps):  # type: ignore[no-untyped-def]
        log.append([x for s in snaps[:2] for x in (s.n_p, s.n_d)])
        return list(ctl(snaps)) if ctl is not None else []

    sim = Simulator(cfg, lat, control=hook_fn)
    groups = {g.name: g for g in sim.groups.values()}
    pool = list(groups["g2"].prefills) + list(groups["g2"].decodes)
    layout: list[hook.Reassign] = []
    for name, (n_p, n_d) in zip(("g0", "g1"), splits, strict=True):
        ps, ds = list(groups[name].prefills), list(groups[name].decodes)
        while len(ps) > n_p and len(ds) < n_d:
            layout.append(hook.Reassign(ps.pop(), "decode"))
            ds.append("")
        while len(ds) > n_d and len(ps) < n_p:
            layout.append(hook.Reassign(ds.pop(), "prefill"))
            ps.append("")
        layout += [hook.Reassign(ps.pop(), "prefill", "g2") for _ in range(len(ps) - n_p)]
        layout += [hook.Reassign(ds.pop(), "decode", "g2") for _ in range(len(ds) - n_d)]
        layout += [hook.Reassign(pool.pop(), "prefill", name) for _ in range(n_p - len(ps))]
        layout += [hook.Reassign(pool.pop(), "decode", name) for _ in range(n_d - len(ds))]
    for a in layout:  # idle instances: the drain is immediate, the switch takes switch_ms
        sim._reassign(a)
    res = sim.run(reqs)
    failed = sum(1 for r in res if not r.ok)
    return (per_period(res, reqs, slo, cfg.control_period_ms, periods),
            per_period(res, reqs, slo, cfg.control_period_ms, periods, group=0), log, failed,
            ctl.moves if ctl is not None else 0)


def report(runs: list[Run], args: argparse.Namespace) -> None:
    k0 = int(args.shift_s // args.period_s)
    k1 = int((args.shift_s + args.burst_s) // args.period_s)
    for scenario in sorted({r.scenario for r in runs}):
        mine = [r for r in runs if r.scenario == scenario]
        ctl = [r for r in mine if r.arm == "controller"]
        for r in mine:
            g = r.goodput_g0 if scenario == "output" else r.goodput
            pre = statistics.fmean(g[1:k0]) if k0 > 1 else 0
            if scenario == "burst":  # during the burst, and after it (spares released?)
                during = statistics.fmean(g[k0 + 1: k1 + 1])
                after = statistics.fmean(g[k1 + 1: -1]) if len(g) > k1 + 2 else 0
                print(f"{scenario:6} run {r.run} {r.arm:17} goodput (all) before {pre:6.2f} "
                      f"during {during:6.2f} after {after:6.2f} req/s | failed "
                      f"{r.failed}/{r.requests} | moves {r.moves} | g0 P/D per period "
                      f"{' '.join(f'{x[0]}/{x[1]}' for x in r.ratio[k0 - 1::2])}")
                continue
            post = statistics.fmean(g[k0 + 1: -1]) if len(g) > k0 + 2 else 0
            extra = (f", reached 90% of static-best {r.periods_to_90} periods after the shift"
                     if r.arm == "controller" else "")
            which = "g0" if scenario == "output" else "all"
            print(f"{scenario:6} run {r.run} {r.arm:15} goodput ({which}) before {pre:6.2f} after "
                  f"{post:6.2f} req/s | failed {r.failed}/{r.requests} | moves {r.moves}{extra}")
        if scenario == "burst":
            continue
        ks = [r.periods_to_90 for r in ctl]
        ok = sum(0 <= k <= 3 for k in ks)
        print(f"{scenario:6} target (<= 3 periods to >= 90% of static-best): met in {ok}/"
              f"{len(ks)} runs (periods: {ks})")


def plot(runs: list[Run], args: argparse.Namespace, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for scenario in sorted({r.scenario for r in runs}):
        mine = [r for r in runs if r.scenario == scenario and r.run == 0]
        fig, (a1, a2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
        for r in mine:
            g = r.goodput_g0 if scenario == "output" else r.goodput
            t = [args.period_s * (k + 0.5) for k in range(len(g))]
            a1.plot(t, g, marker=".", label=r.arm)
        a1.axvline(args.shift_s, color="red", ls=":", label="shift")
        if scenario == "burst":
            a1.axvline(args.shift_s + args.burst_s, color="red", ls="--", label="back")
        a1.set_ylabel("goodput, " + ("g0" if scenario == "output" else "all groups")
                      + " (req/s)")
        a1.legend(fontsize=8)
        a1.grid(alpha=0.3)
        ctl = next(r for r in mine if r.arm == ("controller+spares" if scenario == "burst"
                                                else "controller"))
        t = [args.period_s * (k + 1) for k in range(len(ctl.ratio))]  # the k-th call
        for j, lab in enumerate(("g0 prefill", "g0 decode", "g1 prefill", "g1 decode")):
            a2.step(t, [x[j] for x in ctl.ratio], where="post", label=lab)
        a2.axvline(args.shift_s, color="red", ls=":")
        a2.set_ylabel(f"instances ({ctl.arm})")
        a2.set_xlabel("time (s, virtual)")
        a2.legend(fontsize=8, ncol=2)
        a2.grid(alpha=0.3)
        fig.suptitle(f"ratio shift: {scenario}", fontsize=10)
        fig.tight_layout()
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"ratio-shift-{scenario}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


if __name__ == "__main__":
    sys.exit(main())
