"""Decode hand-off bench: how long a request waits for a decode slot when every one is busy.

A `pdserve up --engine mock` cluster (1 prefill with many slots, 1 decode with few, so the
decode is the bottleneck) with a profile whose prefill is instant and whose decode step
takes ``--step-ms``. c concurrent clients each ask for ``--tokens`` tokens. For every
request the client measures the **hand-off gap**: from its first token (sent by the
prefill) to its next message (the decode's first tokens). It holds the wait for a
decode slot, the KV fetch and one decode step. A freed slot taken at once keeps the gap
near a step or two; a gateway that polls full decodes adds up to its poll interval.

Measured in the same run, runs alternating:
  --baseline-tree DIR   the same load against another source tree
                        (`git archive <commit> | tar -x -C DIR`).

  python bench/decode_wait.py [--runs 3] [--baseline-tree DIR] [--decode-slots 2] [-c 8]
         [--tokens 32] [--step-ms 2] [--requests 200] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.frontdoor import PROFILE, Cluster, drive_times, pct, prompt_set  # noqa: E402


def profile_file(step_ms: float) -> Path:
    """The front-door profile (instant prefill, SmolLM2's KV shape) with a decode step."""
    prof = json.loads(PROFILE.read_text())
    prof["name"] = f"instant prefill, {step_ms} ms decode step"
    prof["decode_ms"] = {"d0": step_ms, "d1": 0.0, "d2": 0.0}
    out = Path(tempfile.mkdtemp(prefix="pdserve-dwait-")) / "profile.json"
    out.write_text(json.dumps(prof))
    return out


async def drive(address: str, c: int, n: int, prompts: list[list[int]],
                tokens: int) -> tuple[float, list[float], int]:
    """n requests from c streams; wall time, hand-off gaps (ms), errors."""
    wall, done, errors = await drive_times(address, c, n, prompts, tokens)
    gaps = [(times[1] - times[0]) * 1e3 for _, times in done if len(times) > 1]
    return wall, gaps, errors + sum(1 for _, times in done if len(times) < 2)


def one_run(tree: Path, args: argparse.Namespace, profile: Path,
            prompts: list[list[int]]) -> dict[str, float]:
    cluster = Cluster(tree, args.prefill_slots, {"PDSERVE_SLOTS": str(args.decode_slots)},
                      profile=profile)
    try:
        cluster.wait()
        asyncio.run(drive(cluster.address, 2, 20, prompts, 4))  # warm channels
        wall, gaps, errors = asyncio.run(drive(cluster.address, args.c, args.requests,
                                               prompts, args.tokens))
    finally:
        cluster.stop()
    out = {"req_s": (args.requests - errors) / wall, "gap_p50_ms": pct(gaps, 0.5),
           "gap_p90_ms": pct(gaps, 0.9), "gap_p99_ms": pct(gaps, 0.99),
           "gap_mean_ms": statistics.fmean(gaps) if gaps else float("nan"),
           "errors": float(errors)}
    print("  " + "  ".join(f"{k} {v:.1f}" for k, v in out.items()), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline-tree", default="", help="another source tree to compare")
    ap.add_argument("--decode-slots", type=int, default=2)
    ap.add_argument("--prefill-slots", type=int, default=16)
    ap.add_argument("-c", type=int, default=8, help="concurrent clients")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--step-ms", type=float, default=2.0)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    prompts = prompt_set(argparse.Namespace(prompt_tokens=32, trace=""))
    profile = profile_file(args.step_ms)
    trees = {"this": ROOT}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in trees}
    for r in range(args.runs):
        for label, tree in trees.items():
            print(f"[{label}] run {r + 1}/{args.runs}", flush=True)
            runs[label].append(one_run(tree, args, profile, prompts))
    print(f"\nDecode hand-off: 1 prefill ({args.prefill_slots} slots), 1 decode "
          f"({args.decode_slots} slots, {args.step_ms} ms step), c={args.c}, {args.tokens} "
          f"tokens, {args.requests} requests; median [min-max] of {args.runs} run(s)")
    print("| tree | req/s | hand-off gap p50 ms | p90 ms | p99 ms | mean ms |")
    print("|---|---|---|---|---|---|")
    summary: dict[str, dict[str, list[float]]] = {}
    for label, rs in runs.items():
        cells = {k: [x[k] for x in rs] for k in rs[0]}
        summary[label] = cells
        print(f"| {label} | " + " | ".join(
            f"{statistics.median(cells[k]):.1f} [{min(cells[k]):.1f}-{max(cells[k]):.1f}]"
            for k in ("req_s", "gap_p50_ms", "gap_p90_ms", "gap_p99_ms", "gap_mean_ms"))
              + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "runs": summary}, indent=1))


if __name__ == "__main__":
    main()
