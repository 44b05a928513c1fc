"""Hot groups: the Mooncake prefix trace in scenario groups, with the ratio controller
on and off (docs/engine.md measured the problem: grouping by prefix gave 4x the
prefix hits, but unsized hot groups took the TTFT p99 from 26 s to 163 s).

The shipped Mooncake trace, open loop at ``--rate-scale`` x its own arrival times, on
``--instances`` instances in the simulator (prefix caches per prefill, as the mock
engine keeps them), four arms over the same arrivals:
- ``ungrouped``: one group of all instances (Eq. 1's split), requests spread over all
  prefills: few prefix hits;
- ``grouped``: ``--groups`` scenario groups by the prompt's first block (hash id mod
  groups, as bench/engine.py groups), equal static groups with Eq. 1's split;
- ``grouped+controller``: the same start, the ratio controller (fixed total: it moves
  instances between groups and roles) every ``--period-s``;
- ``grouped+eq1``: groups sized up front by Eq. 1's allocation for each group's mean
  traffic over the run (an oracle for the mean; the controller has to find it online).

Goal: the grouped prefix hit rate with the ungrouped TTFT p99 or better. Reported per
arm: TTFT p50/p99 (requests that got a first token), failed requests, goodput at the
SLO, token prefix hit rate. ``--runs`` repeats with other rotations of the trace.

  python bench/hot_groups.py --quick
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ratio_common import ArrivedLengths, SimControl, Slo, goodput
from bench.sim import hook
from bench.sim.core import Simulator
from bench.sim.model import Result, SimConfig, SimRequest
from bench.traces import MOONCAKE, load_trace
from services.control.controller import ControllerConfig
from services.control.perfmodel import Deployment, Workload, allocate, best_split, from_latency
from services.control.plan_cli import Req, prefix_hits
from services.engine.mock import LatencyModel


@dataclass
class Arm:
    arm: str
    run: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    failed: int
    requests: int
    goodput_rps: float
    slo_share: float
    hit_rate: float
    moves: int = 0


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def summarise(arm: str, run: int, res: list[Result], reqs: list[SimRequest], slo: Slo,
              moves: int) -> Arm:
    ttft = [r.ttft_ms for r in res if r.ok]
    gp, share = goodput(res, reqs, slo)
    tokens = sum(q.prompt_len for q in reqs)
    return Arm(arm, run, pct(ttft, 0.5), pct(ttft, 0.99), sum(not r.ok for r in res),
               len(res), gp, share, sum(r.cached_tokens for r in res) / tokens, moves)


def layout(sim: Simulator, splits: dict[str, tuple[int, int]], spare_group: str) -> None:
    """Lay groups out as ``splits`` at t = 0 (the simulator starts them alike; the
    surplus waits in a traffic-free group)."""
    groups = {g.name: g for g in sim.groups.values()}
    pool = list(groups[spare_group].prefills) + list(groups[spare_group].decodes)
    moves: list[hook.Reassign] = []
    for name, (n_p, n_d) in splits.items():
        ps, ds = list(groups[name].prefills), list(groups[name].decodes)
        while len(ps) > n_p and len(ds) < n_d:
            moves.append(hook.Reassign(ps.pop(), "decode"))
            ds.append("")
        while len(ds) > n_d and len(ps) < n_p:
            moves.append(hook.Reassign(ds.pop(), "prefill"))
            ps.append("")
        moves += [hook.Reassign(ps.pop(), "prefill", spare_group) for _ in range(len(ps) - n_p)]
        moves += [hook.Reassign(ds.pop(), "decode", spare_group) for _ in range(len(ds) - n_d)]
        moves += [hook.Reassign(pool.pop(), "prefill", name) for _ in range(n_p - len(ps))]
        moves += [hook.Reassign(pool.pop(), "decode", name) for _ in range(n_d - len(ds))]
    for m in moves:  # idle instances: drained at once, serving after switch_ms
        sim._reassign(m)


def one(run: int, lat: LatencyModel, args: argparse.Namespace, slo: Slo) -> list[Arm]:
    tr = load_trace(args.trace)
    if not any(r.hash_ids for r in tr):  # an Azure CSV: every request would be group 0
        raise SystemExit(f"{args.trace}: hot_groups needs a trace with hash_ids (Mooncake-style"
                         " .jsonl); a request's group is its prompt's first block")
    if args.requests:
        start = (run * 997) % max(1, len(tr) - args.requests)
        tr = tr[start: start + args.requests]
    t0 = tr[0].arrival_s
    k = args.groups
    reqs = [SimRequest((r.arrival_s - t0) * 1000.0 / args.rate_scale, r.prompt_len,
                       r.output_len, (r.hash_ids[0] % k) if r.hash_ids else 0, r.hash_ids)
            for r in tr]
    span_s = max(reqs[-1].arrival_ms / 1000.0, 1e-9)
    n = args.instances
    dep = Deployment(prefill_slots=1, decode_slots=args.decode_slots,
                     kv_pool_tokens=args.kv_pool_tokens, prefill_util=args.prefill_util)

    def profile(rs: list[SimRequest]):  # type: ignore[no-untyped-def]
        hits = prefix_hits([Req(0, q.prompt_len, q.output_len, q.hash_ids) for q in rs])
        wl = Workload.from_requests(lat, [(q.prompt_len, q.output_len) for q in rs], hits)
        return from_latency(lat, wl, dep)

    names = {g: f"g{g}" for g in range(k + 1)}
    per_group = {g: [q for q in reqs if q.group == g] for g in range(k)}
    profs = {f"g{g}": profile(per_group[g]) for g in range(k)}
    size = n // k
    eq_split = {f"g{g}": (best_split(profs[f"g{g}"], size).n_p,
                          size - best_split(profs[f"g{g}"], size).n_p) for g in range(k)}
    alloc = allocate({f"g{g}": (profs[f"g{g}"], len(per_group[g]) / span_s)
                      for g in range(k)}, n)
    oracle = {g: (s.n_p, s.n_d) for g, s in alloc.items()}
    out: list[Arm] = []
    biggest = max(max(p + d for p, d in oracle.values()), size)

    def cfg_for(groups: int, p: int, d: int) -> SimConfig:
        return SimConfig(policy=args.policy, groups=groups, prefills_per_group=p,
                         decodes_per_group=d, decode_slots=args.decode_slots,
                         decode_pool_tokens=args.kv_pool_tokens, slo_factor=slo.factor,
                         slo_floor_ms=slo.floor_ms, control_period_ms=args.period_s * 1000,
                         switch_ms=args.switch_s * 1000, seed=run)

    # ungrouped: everything in group 0 of one group
    un = best_split(profile(reqs), n)
    flat = [SimRequest(q.arrival_ms, q.prompt_len, q.output_len, 0, q.hash_ids) for q in reqs]
    res = Simulator(cfg_for(1, un.n_p, un.n_d), lat).run(flat)
    out.append(summarise(f"ungrouped P{un.n_p}/D{un.n_d}", run, res, flat, slo, 0))
    for arm, splits, control in (("grouped", eq_split, False),
                                 ("grouped+controller", eq_split, True),
                                 ("grouped+eq1", oracle, False)):
        ctl = None
        hook_fn = None
        if control:
            ctl = SimControl(lat, dep, ControllerConfig(short_confirm=args.short_confirm),
                             ArrivedLengths(reqs, names),
                             pool=f"g{k}")
            hook_fn = ctl
        cfg = cfg_for(k + 1, biggest // 2 + 1, biggest - biggest // 2 + 1)
        sim = Simulator(cfg, lat, control=hook_fn)
        layout(sim, splits, f"g{k}")
        res = sim.run(reqs)
        label = arm if arm != "grouped+eq1" else "grouped+eq1 " + " ".join(
            f"P{p}/D{d}" for p, d in oracle.values())
        out.append(summarise(label, run, res, reqs, slo, ctl.moves if ctl else 0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trace", default=str(MOONCAKE))
    ap.add_argument("--profile", default="scaled-gpu")
    ap.add_argument("--instances", type=int, default=24)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--rate-scale", type=float, default=4.0)
    ap.add_argument("--requests", type=int, default=0, help="a window of the trace (0: all)")
    ap.add_argument("--decode-slots", type=int, default=64)
    ap.add_argument("--kv-pool-tokens", type=int, default=262144)
    ap.add_argument("--prefill-util", type=float, default=0.7)
    ap.add_argument("--policy", default="forward")
    ap.add_argument("--period-s", type=float, default=10.0)
    ap.add_argument("--switch-s", type=float, default=2.0)
    ap.add_argument("--slo-factor", type=float, default=8.0)
    ap.add_argument("--slo-floor-ms", type=float, default=300.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=60.0)
    ap.add_argument("--short-confirm", type=int, default=1,
                    help="periods a group must stay short (Eq. 1) before it takes more")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick and not args.requests:
        args.requests = 1500
    from services.model.profile import profile_path

    lat = LatencyModel.from_profile(json.loads(profile_path(args.profile).read_text()))
    slo = Slo(args.slo_factor, args.slo_floor_ms, args.tpot_slo_ms)
    arms: list[Arm] = []
    for run in range(args.runs):
        arms += one(run, lat, args, slo)
    for a in arms:
        print(f"run {a.run} {a.arm:34} TTFT p50 {a.ttft_p50_ms:8.0f} p99 {a.ttft_p99_ms:8.0f} ms"
              f" | failed {a.failed:4d}/{a.requests} | goodput {a.goodput_rps:6.2f} req/s "
              f"({100 * a.slo_share:.1f}% met) | prefix hits {100 * a.hit_rate:.1f}%"
              + (f" | moves {a.moves}" if a.moves else ""))
    if args.runs > 1:
        for prefix in ("ungrouped", "grouped", "grouped+controller", "grouped+eq1"):
            mine = [a for a in arms if a.arm.split(" ")[0] == prefix]
            p99 = sorted(a.ttft_p99_ms for a in mine)
            print(f"{prefix:20} TTFT p99 min/median/max {p99[0]:.0f}/{statistics.median(p99):.0f}"
                  f"/{p99[-1]:.0f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(a) for a in arms], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
