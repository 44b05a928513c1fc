"""What the scheduling benches share (live ``bench/scheduling.py`` and simulated
``bench/scheduling_sim.py``): one point of a sweep, percentiles, the trace window, the
success-vs-load plot and the JSON layout. Both import it; neither imports the other."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.traces import TraceRequest

POLICIES = ["forward", "los-queue", "rr-queue", "reported-queue"]


@dataclass
class Point:
    trace: str
    policy: str
    load: float
    requests: int
    ttft_slo_success: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    mean_tpot_ms: float
    goodput_rps: float


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def sample(reqs: list[TraceRequest], n: int, max_prompt: int) -> list[TraceRequest]:
    """A contiguous window of the trace (keeps its burstiness), prompts clipped to the
    modelled context."""
    mid = max(0, len(reqs) // 3)
    win = reqs[mid : mid + n] if len(reqs) > n else reqs
    return [TraceRequest(r.arrival_s, min(r.prompt_len, max_prompt), r.output_len, r.hash_ids)
            for r in win]


def plot(points: list[Point], out_dir: Path, prefix: str = "scheduling",
         policies: list[str] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for trace in sorted({p.trace for p in points}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for policy in policies or POLICIES:
            pts = sorted((p for p in points if p.trace == trace and p.policy == policy),
                         key=lambda p: p.load)
            if pts:
                ax.plot([p.load for p in pts], [100 * p.ttft_slo_success for p in pts],
                        marker="o", label=policy)
        ax.set_xlabel("load (x trace rate, or users)")
        ax.set_ylabel("TTFT-SLO success (%)")
        ax.set_ylim(0, 102)
        ax.set_title(f"{trace}: TTFT-SLO success vs load")
        ax.grid(alpha=0.3)
        ax.legend()
        path = out_dir / f"{prefix}-{trace}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def write_json(points: list[Point], path: Path) -> None:
    """``{trace: {policy: [{load, ttft_slo_success, ttft_p50_ms, ttft_p99_ms, goodput_rps}]}}``"""
    out: dict[str, dict[str, list[dict[str, float]]]] = {}
    for p in points:
        out.setdefault(p.trace, {}).setdefault(p.policy, []).append(
            {"load": p.load, "ttft_slo_success": p.ttft_slo_success,
             "ttft_p50_ms": p.ttft_p50_ms, "ttft_p99_ms": p.ttft_p99_ms,
             "goodput_rps": p.goodput_rps})
    path.write_text(json.dumps(out, indent=2))
