"""Fleet-scale simulation: 10,000 instances replaying an hour of trace, and how the
simulator's time grows from 100 to 10,000 instances.

Every group replays its own rotated copy of the trace, time-compressed so that the trace
alone would keep ``--utilisation`` of the group's prefill slots busy (bench/sim/arrivals.py);
the measured utilisation is printed. Groups run in ``--workers`` processes, one group at a
time each (a group's working set stays in the CPU's caches).

  python bench/sim_fleet.py --trace bench/data/mooncake_synthetic_trace.jsonl \
      --instances 10000 --duration-s 3600  # the 1 h run: 23.8 M requests, 6.5 min on 2 cores
  python bench/sim_fleet.py --scaling 100,1000,2500,5000,10000 --duration-s 60
  python bench/sim_fleet.py --quick                                      # CI-sized
  python bench/sim_fleet.py --instances 1000 --duration-s 120 --policies forward,los-queue \
      --utilisations 0.6,0.9,1.2                  # the forwarding-vs-queue gap at scale
  python bench/sim_fleet.py --trace bench/data/mooncake_synthetic_trace.jsonl --instances 1000 \
      --hot-every 8 --hot-factor 3 --control bench.sim_fleet:ratio_controller --workers 1
                                                  # hot groups, with the ratio controller

Every modelled knob is a flag: --shape (per group, e.g. 12p4d), --gateways, --slots (b_p),
--decode-slots (b_d), --rtt-ms, --kv-gbps, --policy, --profile, --slo-factor.
The baseline of the ratios is the smallest scaling point (time per simulated request).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.sim.fleet import (
    CONTROL_CHUNK_GROUPS,
    FleetResult,
    FleetSpec,
    groups_for,
    run_fleet,
    save,
    shape,
    with_groups,
)
from bench.sim.model import SimConfig
from bench.traces import AZURE_CODE


def spec_from(args: argparse.Namespace) -> FleetSpec:
    n_p, n_d = shape(args.shape)
    cfg = SimConfig(args.policy, groups=groups_for(args.instances, n_p, n_d),
                    prefills_per_group=n_p, decodes_per_group=n_d, slots=args.slots,
                    decode_slots=args.decode_slots, gateways=args.gateways, rtt_ms=args.rtt_ms,
                    kv_gbps=args.kv_gbps, slo_factor=args.slo_factor, seed=args.seed,
                    control_period_ms=args.control_period_s * 1e3 if args.control else 0.0)
    return FleetSpec(cfg, args.trace, args.duration_s * 1e3, args.compress, args.utilisation,
                     args.max_prompt, args.profile, args.workers, args.control,
                     args.hot_every, args.hot_factor, chunk_groups(args))


def chunk_groups(args: argparse.Namespace) -> int:
    if args.chunk_groups is not None:
        return int(args.chunk_groups)
    return CONTROL_CHUNK_GROUPS if args.control else FleetSpec.chunk_groups


def line(r: FleetResult, base: FleetResult | None) -> str:
    s = r.stats
    inst = int(r.spec["cfg"]["groups"]) * (int(r.spec["cfg"]["prefills_per_group"])  # type: ignore[index]
                                           + int(r.spec["cfg"]["decodes_per_group"]))  # type: ignore[index]
    us = 1e6 * r.wall_s / max(float(s["requests"]), 1)
    ratio = f"{us / (1e6 * base.wall_s / max(float(base.stats['requests']), 1)):.2f}x" \
        if base else "1.00x"
    return (f"| {inst:,} | {int(s['requests']):,} | {s['sim_s']:.0f} | {r.wall_s:.1f} | "
            f"{r.requests_per_s:,.0f} | {r.events_per_s:,.0f} | {us:.1f} ({ratio}) | "
            f"{1e6 * r.cpu_s / max(float(s['requests']), 1):.1f} | "
            f"{100 * s['prefill_utilisation']:.0f}% | {100 * s['slo_success']:.1f}% | "
            f"{s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} | {r.max_rss_mb:.0f} |")


HEADER = ("| instances | requests | simulated s | wall s | requests/s | events/s | "
          "wall us/request (vs smallest) | CPU us/request | prefill util | TTFT-SLO | "
          "TTFT p50/p99 ms | peak RSS/worker MB |\n" + "|---" * 12 + "|")


def plot(results: list[FleetResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inst = [r.spec["cfg"]["groups"] * (r.spec["cfg"]["prefills_per_group"]  # type: ignore[index]
                                       + r.spec["cfg"]["decodes_per_group"]) for r in results]  # type: ignore[index]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ax[0].plot(inst, [r.wall_s for r in results], marker="o")
    ax[0].set_xlabel("instances")
    ax[0].set_ylabel("wall time (s)")
    ax[0].set_title("simulator time vs fleet size\n(same simulated duration)")
    ax[0].grid(alpha=0.3)
    ax[1].plot(inst, [1e6 * r.wall_s / max(float(r.stats["requests"]), 1) for r in results],
               marker="o", label="wall")
    ax[1].plot(inst, [1e6 * r.cpu_s / max(float(r.stats["requests"]), 1) for r in results],
               marker="s", label="cpu (all workers)")
    ax[1].set_xlabel("instances")
    ax[1].set_ylabel("us per simulated request")
    ax[1].set_ylim(bottom=0)
    ax[1].set_title("cost per request")
    ax[1].grid(alpha=0.3)
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ratio_controller() -> object:
    """``--control bench.sim_fleet:ratio_controller``: ``services.control``'s pure ratio
    controller (fixed total, moves within and between the groups it sees) through the
    adapter the control benches use, on the §1.3 signals only (no Eq. 1 profile)."""
    from bench.ratio_common import SimControl
    from bench.sim.fleet import latency_of
    from services.control.perfmodel import Deployment

    return SimControl(latency_of("scaled-gpu"), Deployment(decode_slots=64), use_model=False)


def sweep(args: argparse.Namespace, base: FleetSpec) -> int:
    """Policies x utilisations at one fleet size: TTFT-SLO success and TTFT percentiles."""
    policies = args.policies.split(",")
    utils = [float(x) for x in args.utilisations.split(",")]
    rows = []
    print("| policy | target util | measured prefill util | requests | TTFT-SLO | "
          "TTFT p50 / p99 ms | wall s |\n|---|---|---|---|---|---|---|")
    for u in utils:
        for pol in policies:
            spec = replace(base, utilisation=u, cfg=replace(base.cfg, policy=pol))
            r = run_fleet(spec)
            s = r.stats
            rows.append((pol, u, s))
            print(f"| {pol} | {u:g} | {100 * s['prefill_utilisation']:.0f}% | "
                  f"{int(s['requests']):,} | {100 * s['slo_success']:.1f}% | "
                  f"{s['ttft_p50_ms']:.0f} / {s['ttft_p99_ms']:.0f} | {r.wall_s:.0f} |",
                  flush=True)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for pol in policies:
        pts = [(u, s["slo_success"]) for p, u, s in rows if p == pol]
        ax.plot([u for u, _ in pts], [100 * v for _, v in pts], marker="o", label=pol)
    ax.set_xlabel("offered prefill load (share of capacity)")
    ax.set_ylabel("TTFT-SLO success (%)")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{base.instances:,} instances, {Path(base.trace).stem}")
    out = Path(args.out_dir) / f"sim-fleet-policies-{Path(base.trace).stem}.png"
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"plot: {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(AZURE_CODE))
    ap.add_argument("--instances", type=int, default=10_000)
    ap.add_argument("--scaling", default="", help="comma list of instance counts")
    ap.add_argument("--shape", default="12p4d", help="prefills and decodes per group")
    ap.add_argument("--gateways", type=int, default=2)
    ap.add_argument("--slots", type=int, default=1, help="b_p")
    ap.add_argument("--decode-slots", type=int, default=64, help="b_d")
    ap.add_argument("--rtt-ms", type=float, default=1.0)
    ap.add_argument("--kv-gbps", type=float, default=10.0)
    ap.add_argument("--policy", default="forward")
    ap.add_argument("--profile", default="scaled-gpu")
    ap.add_argument("--slo-factor", type=float, default=4.0)
    ap.add_argument("--duration-s", type=float, default=3600.0)
    ap.add_argument("--utilisation", type=float, default=0.6,
                    help="compress the trace until it alone would keep this share of the "
                         "prefill slots busy")
    ap.add_argument("--compress", type=float, default=0.0, help="explicit compression")
    ap.add_argument("--max-prompt", type=int, default=16384)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--chunk-groups", type=int, default=None,
                    help=f"groups a worker simulates at once (0: all; a controller moving "
                         f"instances between groups sees one chunk). Default "
                         f"{FleetSpec.chunk_groups}, {CONTROL_CHUNK_GROUPS} with --control")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", default="", help="MODULE:FACTORY of a control callback")
    ap.add_argument("--control-period-s", type=float, default=10.0)
    ap.add_argument("--hot-every", type=int, default=0,
                    help="every Nth group is hot (gets --hot-factor times the rate)")
    ap.add_argument("--hot-factor", type=float, default=1.0)
    ap.add_argument("--policies", default="", help="sweep: comma list of policies")
    ap.add_argument("--utilisations", default="0.6,0.9,1.2", help="sweep: target loads")
    ap.add_argument("--quick", action="store_true", help="CI-sized: 100 and 400 instances, 20 s")
    ap.add_argument("--out-dir", default="bench/out")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.scaling = args.scaling or "100,400"
        args.duration_s = min(args.duration_s, 20.0)
    base_spec = spec_from(args)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.policies:
        return sweep(args, base_spec)
    n_p, n_d = shape(args.shape)
    counts = [int(x) for x in args.scaling.split(",")] if args.scaling else [args.instances]
    results: list[FleetResult] = []
    print(f"trace {Path(args.trace).name}, groups of {args.shape}, policy {args.policy}, "
          f"{args.duration_s:g} s simulated, {args.workers} workers")
    print(HEADER)
    for n in counts:
        spec = with_groups(base_spec, groups_for(n, n_p, n_d))
        r = run_fleet(replace(spec))
        results.append(r)
        print(line(r, results[0]), flush=True)
    print(f"trace compression x{results[0].compress:.1f} (each group sees {results[0].compress:.1f}"
          f" times the trace's rate)")
    if args.control:
        print(f"controller moves (role/group switches): "
              f"{', '.join(str(int(r.stats['moves'])) for r in results)}")
    if len(results) > 1:
        path = out / "sim-fleet-scaling.png"
        plot(results, path)
        print(f"plot: {path}")
    if args.json:
        save(results, Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
