"""``bench/scheduling.py --sim``: the scheduling sweep in the discrete-event simulator.

Same traces, policies, SLO rule and outputs (CSV, one PNG per trace, ``--json``) as the
live bench, but thousands of requests per point in seconds, and no 2-core machine in the
way. The policy code is the live gateway's (see ``bench/simulator.py``).

  python bench/scheduling.py --sim --mode closed --slo-factor 8
  python bench/scheduling.py --sim --mode open --loads 1,2,4,8

It also prints the issue's target check: the first load where least-open-streams with
local queues (``los-queue``) falls to <= 60% success, and forwarding's success there.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from dataclasses import asdict
from pathlib import Path

from bench.report import Point, percentile, plot, sample, write_json
from bench.simulator import SIM_POLICIES, Result, SimConfig, SimRequest, Simulator
from bench.traces import AZURE_CODE, MOONCAKE, TraceRequest, load_trace, paper_example


def summarise(trace: str, policy: str, load: float, res: list[Result]) -> Point:
    ttfts = [r.ttft_ms for r in res if r.ok]
    met = sum(r.slo_met for r in res)
    wall_s = max(r.end_ms for r in res) / 1e3
    return Point(trace, policy, load, len(res), met / len(res), percentile(ttfts, 0.5),
                 percentile(ttfts, 0.99), 0.0, met / wall_s if wall_s > 0 else 0.0)


def target_check(points: list[Point], trace: str) -> str:
    los = sorted((p for p in points if p.trace == trace and p.policy == "los-queue"),
                 key=lambda p: p.load)
    fwd = {p.load: p for p in points if p.trace == trace and p.policy == "forward"}
    for p in los:
        if p.ttft_slo_success <= 0.60 and p.load in fwd:
            f = fwd[p.load].ttft_slo_success
            verdict = "met" if f >= 0.99 else "not met"
            return (f"{trace}: los-queue falls to {100 * p.ttft_slo_success:.1f}% at load "
                    f"{p.load:g}; forward holds {100 * f:.1f}% there (target >= 99%: {verdict})")
    return f"{trace}: los-queue never fell to <= 60% in this sweep"


def run_sim(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from services.engine.mock import LatencyModel
    from services.model.profile import profile_path

    latency = LatencyModel.from_profile(json.loads(profile_path(args.profile).read_text()))
    n_req = args.requests if args.requests != 200 else (600 if args.quick else 3000)
    traces = args.trace or [str(AZURE_CODE),
                            str(MOONCAKE), "paper"]
    closed = args.mode == "closed"
    loads = [float(x) for x in args.loads.split(",")] if args.loads else (
        [8, 16, 24, 32, 48, 64, 72, 96, 128] if closed else [0.5, 1, 2, 4, 8, 16])
    policies = [p for p in args.policies.split(",") if p]
    if args.policies == "forward,los-queue,rr-queue,reported-queue":
        policies = SIM_POLICIES
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    half_p, half_d = max(1, args.prefill // 2), max(1, args.decode // 2)
    points: list[Point] = []
    for trace in traces:
        # The same window of the trace as the live bench takes, for run/sim parity.
        reqs: list[TraceRequest] = (paper_example(bursts=max(1, n_req // 4)) if trace == "paper"
                                    else sample(load_trace(trace), n_req, args.max_prompt))
        name = "paper" if trace == "paper" else Path(trace).stem
        bar = tqdm(total=len(policies) * len(loads), desc=f"sim {name}", unit="point")
        for load in loads:
            for policy in policies:
                cfg = SimConfig(policy, prefills_per_group=half_p, decodes_per_group=half_d,
                                slo_factor=args.slo_factor, slo_floor_ms=args.slo_floor_ms)
                specs = [SimRequest(0.0 if closed else r.arrival_s * 1e3 / load,
                                    min(r.prompt_len, args.max_prompt), r.output_len, i % 2)
                         for i, r in enumerate(reqs)]
                res = Simulator(cfg, latency).run(specs, closed_users=int(load) if closed else 0)
                pt = summarise(name, policy, load, res)
                points.append(pt)
                bar.update(1)
                bar.write(f"{name:28} {policy:15} load {load:6.1f}: SLO success "
                          f"{100 * pt.ttft_slo_success:5.1f}% | TTFT p50 {pt.ttft_p50_ms:7.0f}"
                          f" p99 {pt.ttft_p99_ms:7.0f} ms | goodput {pt.goodput_rps:6.2f}/s")
        bar.close()
    stem = f"scheduling-sim-{args.mode}"
    with open(out_dir / f"{stem}.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(asdict(points[0]).keys()))
        w.writeheader()
        w.writerows(asdict(p) for p in points)
    for path in plot(points, out_dir, prefix=stem, policies=policies):
        print(f"plot: {path}")
    if args.json:
        write_json(points, Path(args.json))
    for trace in sorted({p.trace for p in points}):
        print(target_check(points, trace))
    mean = statistics.fmean(p.requests for p in points)
    print(f"csv: {out_dir / f'{stem}.csv'} ({len(points)} points, {mean:.0f} requests each)")
    return 0
