"""The fault matrix at a larger scale: one real-process cluster (tiny model, 2 prefills, 2
decodes, 2 gateways, kvstore, Redis), every fault of tests/faults/cases.py in turn, and a
table: fault, sent, OK, clear error, unclear, hung, recovery time, KV held.

  .venv/bin/python bench/chaos.py            40 requests per fault
  .venv/bin/python bench/chaos.py --quick    8 per fault (what CI's tests/faults runs)
  .venv/bin/python bench/chaos.py --cases kv_cap,redis_restart --json out.json

The baseline measured in the same run is the no-fault row: the same load with nothing
injected; each fault's recovery time is read against it. ``--trace`` is accepted for the
common bench interface and ignored: the load is fixed token prompts, not a trace.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.faults import cases
from tests.faults.harness import ProcCluster, Row, netns_possible, run_load


def baseline(c: ProcCluster, n: int) -> Row:
    row = Row("none (baseline)")
    out = run_load(cases._reqs(n, seed=1), c.procs["gateway-0"].address, cases.DEADLINE_S)
    row.add(out)
    row.kv_held = c.settled_kv()
    row.recovery_s = round(c.wait_serving(), 2)
    return row


def table(rows: list[Row]) -> str:
    head = f"| {'fault':<44} | sent | OK | clear error | unclear | hung | recovery s | KV held |"
    lines = [head, "|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|"]
    for r in rows:
        lines.append(f"| {r.fault:<44} | {r.sent:>4} | {r.ok:>2} | {r.clear:>11} | "
                     f"{r.unclear:>7} | {r.hung:>4} | {r.recovery_s:>10.2f} | {r.kv_held:>7} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 requests per fault")
    ap.add_argument("--n", type=int, default=0, help="requests per fault (default 40)")
    ap.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    ap.add_argument("--json", default="", help="write the rows here")
    ap.add_argument("--trace", default="", help="ignored (fixed prompts)")
    ap.add_argument("--workdir", default="", help="keep the processes' logs here")
    args = ap.parse_args(argv)
    n = args.n or (8 if args.quick else 40)
    chosen = [f for f in cases.ALL if not args.cases or f.__name__ in args.cases.split(",")]
    why_not = netns_possible()
    if why_not:
        chosen = [f for f in chosen if f is not cases.partition]
        print(f"partition case skipped: {why_not}")
    with tempfile.TemporaryDirectory(prefix="pdserve-chaos-") as tmp:
        c = ProcCluster(Path(args.workdir or tmp), gateways=2, partition=not why_not)
        t0 = time.monotonic()
        try:
            c.start()
            print(f"cluster up in {time.monotonic() - t0:.1f} s; {n} requests per fault")
            rows = [baseline(c, n)]
            for case in chosen:
                t1 = time.monotonic()
                row = case(c, n)
                rows.append(row)
                print(f"{row.fault}: {row.ok}/{row.sent} ok, {row.clear} clear, "
                      f"{row.unclear} unclear, {row.hung} hung, recovery {row.recovery_s} s, "
                      f"KV {row.kv_held} ({time.monotonic() - t1:.0f} s) {row.codes} {row.notes}",
                      flush=True)
        finally:
            c.stop()
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    bad = [r for r in rows if r.hung or r.unclear or r.kv_held]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
