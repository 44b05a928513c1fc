"""Static P/D ratio sweep: goodput at the TTFT/E2E SLO against n_p : n_d at a fixed
instance count, per workload, with Eq. 1's prediction marked (P/D-Serve Fig. 13a: the
best ratio >= 1.6x the others).

Simulator (default): one group of ``--instances`` instances, every split from P1 to
P(N-1). Goodput of a split = the highest open-loop rate at which ``--success`` (95%) of
the requests meet both SLOs, found by bisection: the paper's load method (raise the load
until the success rate drops below target). Live (``--live``): the same sweep on a real
``pdserve up --engine mock`` cluster at small scale (``--live-instances``), closed loop
with ``users`` = ``--users-factor`` x the predicted best capacity x its no-wait E2E,
goodput = SLO-meeting completions per second.

Per run and workload it prints: goodput per split, best/worst ratio, the predicted best
split and whether it is the measured best or next to it. ``--runs 3`` repeats with other
samples (seeds) and reports min/median/max.

  python bench/ratio_sweep.py --quick
  python bench/ratio_sweep.py --runs 3 --json docs/img/ratio-sweep.json
  python bench/ratio_sweep.py --live --workloads chat --live-instances 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ratio_common import (
    WORKLOADS,
    Item,
    Point,
    Slo,
    Summary,
    predicted,
    sim_requests,
    summarise,
    workload,
)
from bench.sim.core import Simulator
from bench.sim.model import SimConfig
from services.control.perfmodel import Deployment, Workload, best_split, effective_b_d, sweep
from services.engine.mock import LatencyModel


def deployment(lat: LatencyModel, items: list[Item], args: argparse.Namespace) -> Deployment:
    dep = Deployment(prefill_slots=1, decode_slots=args.decode_slots,
                     kv_pool_tokens=args.kv_pool_tokens, prefill_parallel=True)
    wl = Workload.from_requests(lat, [(i.prompt_len, i.output_len) for i in items])
    # Eq. 1's b_d: what the pool holds of the mean sequence (the simulator admits by each
    # request's own prompt + output, as the live decode does).
    return Deployment(prefill_slots=1, decode_slots=effective_b_d(lat, wl, dep),
                      prefill_parallel=True)


def prefix_estimate(items: list[Item]) -> list[int]:
    from services.control.plan_cli import Req, prefix_hits

    return prefix_hits([Req(0.0, i.prompt_len, i.output_len, i.hash_ids) for i in items])


def capacity_at_slo(cfg: SimConfig, lat: LatencyModel, items: list[Item], slo: Slo,
                    hi_rate: float, e2e0_ms: float, target: float, iters: int,
                    seed: int) -> tuple[float, float]:
    """The highest open-loop (Poisson) rate at which >= ``target`` of the requests meet
    both SLOs, by bisection (the paper's load method: raise the load until the success
    rate drops). Each probe runs ``20 x`` the no-wait E2E of virtual time (at least 1500
    requests) so that a slowly growing backlog shows. Returns (rate, share there)."""
    lo, hi, share_lo = 0.0, hi_rate, 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        n = max(1500, int(mid * 20 * e2e0_ms / 1000.0))
        its = [items[k % len(items)] for k in range(n)]
        reqs = sim_requests(its, rate_rps=mid, seed=seed)
        res = Simulator(cfg, lat).run(reqs)
        share = sum(slo.met(r, q.output_len) for r, q in zip(res, reqs, strict=True)) / n
        if share >= target:
            lo, share_lo = mid, share
        else:
            hi = mid
    return lo, share_lo


def sim_sweep(name: str, run: int, items: list[Item], lat: LatencyModel,
              args: argparse.Namespace, slo: Slo) -> tuple[list[Point], Summary]:
    dep = deployment(lat, items, args)
    prefix = any(i.hash_ids for i in items)
    cached = prefix_estimate(items) if prefix else None
    prof = predicted(lat, items, dep, cached)
    n = args.instances
    pred = best_split(prof, n, floor=1)
    pred_u = best_split(prof.with_prefill_util(args.prefill_util), n, floor=1)
    caps = {s.n_p: s.capacity for s in sweep(prof, n, floor=1)}
    points = []
    for n_p in range(1, n):
        cfg = SimConfig(policy=args.policy, groups=1, prefills_per_group=n_p,
                        decodes_per_group=n - n_p, decode_slots=args.decode_slots,
                        decode_pool_tokens=args.kv_pool_tokens,
                        slo_factor=slo.factor, slo_floor_ms=slo.floor_ms, seed=run,
                        prefix_cache=prefix)
        rate, share = capacity_at_slo(cfg, lat, items, slo, 2.0 * pred.capacity, prof.e2e_ms,
                                      args.success, args.iters, run)
        points.append(Point(name, run, n_p, n - n_p, rate, share, caps[n_p]))
    return points, summarise(name, run, points, pred.n_p, 0, dep.decode_slots, pred_u.n_p,
                             args.prefill_util)


def plot(points: list[Point], sums: list[Summary], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted({p.workload for p in points}, key=lambda w: WORKLOADS.index(w)
                   if w in WORKLOADS else 99)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        runs = sorted({p.run for p in points if p.workload == name})
        for r in runs:
            pts = sorted((p for p in points if p.workload == name and p.run == r),
                         key=lambda p: p.n_p)
            ax.plot([p.n_p for p in pts], [p.goodput_rps for p in pts], marker="o",
                    alpha=0.8, label=f"measured (run {r})" if len(runs) > 1 else "measured")
        pts0 = sorted((p for p in points if p.workload == name and p.run == runs[0]),
                      key=lambda p: p.n_p)
        top = max(p.goodput_rps for p in points if p.workload == name)
        cap_top = max(p.predicted_capacity for p in pts0)
        ax.plot([p.n_p for p in pts0], [p.predicted_capacity / cap_top * top for p in pts0],
                ls="--", color="gray", label="Eq. 1 capacity (scaled)")
        s0 = next(s for s in sums if s.workload == name and s.run == runs[0])
        pn = int(s0.predicted.split("/")[0][1:])
        ax.axvline(pn, color="red", ls=":", label=f"Eq. 1 best {s0.predicted}")
        if s0.predicted_u and s0.predicted_u != s0.predicted:
            pu = int(s0.predicted_u.split("/")[0][1:])
            ax.axvline(pu, color="purple", ls="-.",
                       label=f"Eq. 1, u_p {s0.u_p:g}: {s0.predicted_u}")
        n = pts0[0].n_p + pts0[0].n_d
        ax.set_xticks(range(1, n))
        ax.set_xticklabels([f"{k}:{n - k}" for k in range(1, n)], rotation=60, fontsize=7)
        ax.set_xlabel("n_p : n_d")
        ax.set_ylabel("goodput at SLO (req/s)")
        who = f", {s0.users} users" if s0.users else ""
        ax.set_title(f"{name} (b_d {s0.b_d}{who})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def report(sums: list[Summary]) -> None:
    for name in sorted({s.workload for s in sums}):
        mine = [s for s in sums if s.workload == name]
        ratios = sorted(s.best_over_worst_2 for s in mine)
        share = sorted(s.predicted_goodput_share for s in mine)
        print(f"{name:10} best/worst (>= 2 per role) {min(ratios):.2f}x / "
              f"{statistics.median(ratios):.2f}x / {max(ratios):.2f}x (min/median/max over "
              f"{len(mine)} runs; >= 1.6x, the paper's figure, in "
              f"{sum(r >= 1.6 for r in ratios)}/{len(mine)}) | best "
              f"{', '.join(s.best for s in mine)} | Eq. 1 "
              f"{', '.join(s.predicted for s in mine)}: measured best or next to it in "
              f"{sum(s.predicted_adjacent for s in mine)}/{len(mine)}, goodput "
              f"{100 * min(share):.0f}-{100 * max(share):.0f}% of the best"
              + (f" | Eq. 1 with u_p {mine[0].u_p:g}: {', '.join(s.predicted_u for s in mine)}"
                 f", best or next in {sum(s.predicted_u_adjacent for s in mine)}/{len(mine)}"
                 if mine[0].predicted_u else ""))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--workloads", default="code,chat,chat-long,mooncake")
    ap.add_argument("--trace", help="sweep this trace (.csv/.jsonl) as workload 'trace'")
    ap.add_argument("--profile", default="scaled-gpu")
    ap.add_argument("--instances", type=int, default=12)
    ap.add_argument("--decode-slots", type=int, default=64, help="decode batch cap")
    ap.add_argument("--kv-pool-tokens", type=int, default=65536,
                    help="decode KV room in tokens (bounds b_d by whole sequences)")
    ap.add_argument("--requests", type=int, default=4000)
    ap.add_argument("--users-factor", type=float, default=1.5, help="live closed loop: "
                    "users = this x the predicted best capacity x its no-wait E2E")
    ap.add_argument("--policy", default="forward", help="prefill scheduling policy (sim)")
    ap.add_argument("--success", type=float, default=0.95,
                    help="sim: goodput = the highest rate with this share meeting both SLOs")
    ap.add_argument("--iters", type=int, default=7, help="sim: bisection steps per split")
    ap.add_argument("--prefill-util", type=float, default=0.7,
                    help="u_p for the second Eq. 1 prediction (prefill headroom the TTFT SLO "
                         "and the scheduler need)")
    ap.add_argument("--slo-factor", type=float, default=8.0)
    ap.add_argument("--slo-floor-ms", type=float, default=300.0)
    ap.add_argument("--tpot-slo-ms", type=float, default=60.0)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--live", action="store_true", help="also sweep a live mock cluster")
    ap.add_argument("--no-sim", action="store_true", help="live only")
    ap.add_argument("--live-instances", type=int, default=6)
    ap.add_argument("--live-requests", type=int, default=120)
    ap.add_argument("--live-decode-slots", type=int, default=8, help="live decodes' b_d")
    ap.add_argument("--live-kv-pool-tokens", type=int, default=32768)
    ap.add_argument("--live-output-scale", type=float, default=0.5,
                    help="live answers are this share of the workload's (shorter runs)")
    ap.add_argument("--time-scale", type=float, default=3.0,
                    help="live: stretch modelled times (as bench/scheduling.py does)")
    ap.add_argument("--out-dir", default="bench/out")
    ap.add_argument("--json")
    args = ap.parse_args()
    from services.model.profile import profile_path

    raw = json.loads(profile_path(args.profile).read_text())
    lat = LatencyModel.from_profile(raw)
    if args.quick:
        args.requests = min(args.requests, 1200)
        args.iters = min(args.iters, 5)
    names = [w for w in args.workloads.split(",") if w]
    if args.trace:
        names = ["trace"]
    slo = Slo(args.slo_factor, args.slo_floor_ms, args.tpot_slo_ms)
    from tqdm import tqdm

    points: list[Point] = []
    sums: list[Summary] = []
    bar = tqdm(total=0 if args.no_sim else len(names) * args.runs, desc="sim sweep",
               unit="sweep")
    for name in [] if args.no_sim else names:
        for run in range(args.runs):
            items = trace_items(args.trace, args.requests) if name == "trace" else \
                workload(name, args.requests, seed=run)
            pts, s = sim_sweep(name, run, items, lat, args, slo)
            points += pts
            sums.append(s)
            bar.update(1)
            bar.write(f"{name} run {run}: " + " ".join(
                f"P{p.n_p}:{p.goodput_rps:.1f}" for p in pts)
                + f" | best {s.best}, Eq. 1 {s.predicted} (rank {s.predicted_rank}), "
                  f"best/worst {s.best_over_worst:.2f}x")
    bar.close()
    report(sums)
    out_dir = Path(args.out_dir)
    if points:
        print(f"plot: {plot(points, sums, out_dir / 'ratio-sweep-sim.png', 'simulator')}")
    live: dict[str, object] = {}
    if args.live:
        from bench.ratio_live import live_sweep

        lpts, lsums = live_sweep(names, lat, args, slo)
        report(lsums)
        print(f"plot: {plot(lpts, lsums, out_dir / 'ratio-sweep-live.png', 'live mock cluster')}")
        live = {"points": [asdict(p) for p in lpts], "summaries": [asdict(s) for s in lsums]}
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"sim": {"points": [asdict(p) for p in points],
                     "summaries": [asdict(s) for s in sums]}, "live": live}, indent=1))
    return 0


def trace_items(path: str, n: int) -> list[Item]:
    from bench.ratio_common import MAX_PROMPT
    from bench.traces import load_trace

    return [Item(min(r.prompt_len, MAX_PROMPT), max(1, r.output_len), r.hash_ids)
            for r in load_trace(path)[:n]]


if __name__ == "__main__":
    sys.exit(main())
