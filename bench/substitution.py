"""Fault substitution on the live mock cluster (P/D-Serve §1.4).

For each fault (SIGKILL of a prefill, a decode, the kvstore, the gateway) a fresh
``pdserve up --engine mock`` cluster (2 prefill + 2 decode) serves a closed loop of
``--users`` clients replaying the trace; after ``--warm`` seconds one process is killed,
and the load runs ``--after`` more seconds. Modes:
  - restart: the launcher restarts the dead child (per-role processes);
  - spare:   ``--switchable --spares 1``: a prefill's or decode's role goes to an idle
             spare (a role switch: weights already loaded) and a new spare starts.

Reported per fault (and per run; min/median/max over ``--runs``):
  - lost: requests in flight at the kill that ended with an error status (by gRPC
    code/reason; a clear status is fine); refused: requests started while the process
    was down that ended with one (the clients retry after 0.2 s, so this counts
    attempts); hung: requests that ran into the client's own deadline
    (``--client-timeout``; target 0);
  - back_s: time from the kill until the replacement is SERVING (supervisor.jsonl);
  - recover_s: time from the kill until a window's completions (2 s, or 4 completions'
    worth) reach 90% of the pre-kill rate measured in the same run (the baseline);
  - kv_held: bytes the kvstore and every decode pool hold once the load has stopped
    and settled (target 0).

  python bench/substitution.py --quick
  python bench/substitution.py --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import UpCluster
from bench.traces import AZURE_CODE, TraceRequest, load_trace, prompt_ids
from pdserve.v1 import (
    decode_service_pb2,
    decode_service_pb2_grpc,
    generation_service_pb2,
    generation_service_pb2_grpc,
    kvstore_service_pb2,
    kvstore_service_pb2_grpc,
)
from services.common.errors import error_info

FAULTS = ("prefill", "decode", "kvstore", "gateway")
VOCAB = 49152  # SmolLM2's; the mock profile serves its tokenizer


@dataclass
class Outcome:
    start: float
    end: float
    ok: bool
    status: str = ""  # gRPC code [reason] when not ok; "HUNG" on the client deadline


@dataclass
class Load:
    """A closed loop of users; every request's outcome with monotonic times."""

    address: str
    items: list[TraceRequest]
    users: int
    client_timeout: float
    vocab: int = VOCAB
    outcomes: list[Outcome] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        n = iter(range(10**9))

        async def user(u: int) -> None:
            async with grpc.aio.insecure_channel(self.address) as ch:
                stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
                while not self.stop.is_set():
                    i = next(n)
                    req = self.items[i % len(self.items)]
                    o = await one(stub, prompt_ids(req, i, self.vocab, salt=u), req.output_len,
                                  self.client_timeout)
                    self.outcomes.append(o)
                    if not o.ok:
                        await asyncio.sleep(0.2)  # a refused connect must not spin

        await asyncio.gather(*(user(u) for u in range(self.users)))


async def one(stub: generation_service_pb2_grpc.GenerationServiceStub, ids: list[int],
              out_len: int, deadline_s: float) -> Outcome:
    t0 = time.monotonic()
    try:
        async for _ in stub.Generate(generation_service_pb2.GenerateRequest(
                prompt_token_ids=ids, max_tokens=out_len), timeout=deadline_s):
            pass
    except grpc.aio.AioRpcError as e:
        if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and error_info(e) is None:
            return Outcome(t0, time.monotonic(), False, "HUNG")
        info = error_info(e)
        return Outcome(t0, time.monotonic(), False,
                       e.code().name + (f" [{info.reason}]" if info else ""))
    return Outcome(t0, time.monotonic(), True)


def ready(up: UpCluster, name: str) -> dict[str, object]:
    return dict(json.loads((up.log_dir / f"{name}.ready.json").read_text()))


def events(up: UpCluster) -> list[dict[str, object]]:
    p = up.log_dir / "supervisor.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


async def kv_held(up: UpCluster) -> int:
    """Bytes held by the kvstore and the decode pools (decode-*, spare-* workers)."""
    total = 0
    for f in sorted(up.log_dir.glob("*.ready.json")):
        name = f.name.removesuffix(".ready.json")
        addr = str(json.loads(f.read_text())["address"])
        async with grpc.aio.insecure_channel(addr) as ch:
            try:
                if name == "kvstore":
                    s = await kvstore_service_pb2_grpc.KvStoreServiceStub(ch).GetKvStoreStats(
                        kvstore_service_pb2.GetKvStoreStatsRequest(), timeout=5)
                    total += s.bytes_held
                elif name.startswith(("decode", "spare", "prefill")):
                    d = await decode_service_pb2_grpc.DecodeServiceStub(ch).GetDecodeStats(
                        decode_service_pb2.GetDecodeStatsRequest(), timeout=5)
                    total += d.kv_bytes_held
            except grpc.aio.AioRpcError:
                pass  # a per-role prefill has no DecodeService
    return total


@dataclass
class Result:
    fault: str
    mode: str
    run: int
    baseline_rps: float
    ok: int
    lost: int  # in flight at the kill, ended with an error status
    refused: int  # started after the kill, ended with an error status (while it was down)
    hung: int
    statuses: dict[str, int]
    back_s: float
    recover_s: float
    kv_held: int
    ok_at: list[float] = field(default_factory=list)  # completions, s since the kill
    failed_at: list[float] = field(default_factory=list)  # error endings, s since the kill


def target_name(fault: str) -> str:
    return {"prefill": "prefill-0", "decode": "decode-0"}.get(fault, fault)


async def scenario(fault: str, mode: str, run: int, args: argparse.Namespace,
                   items: list[TraceRequest]) -> Result:
    extra = ["--engine", "mock", "--profile", args.profile, "--http-port", "-1"]
    if mode == "spare":
        extra += ["--switchable", "--spares", "1"]
    with UpCluster("mock", args.prefill, args.decode, extra=extra,
                   env={"PDSERVE_REDIS_URL": ""}) as up:
        load = Load(up.address, items, args.users, args.client_timeout)
        task = asyncio.create_task(load.run())
        await asyncio.sleep(args.warm)
        name = target_name(fault)
        t_kill = time.monotonic()
        wall_kill = time.time()
        os.kill(int(ready(up, name)["pid"]), signal.SIGKILL)
        await asyncio.sleep(args.after)
        load.stop.set()
        await task
        await asyncio.sleep(args.settle)
        held = await kv_held(up)
        evs = events(up)
    base = [o for o in load.outcomes if o.ok and t_kill - args.warm + 1.0 <= o.end < t_kill]
    rps = len(base) / max(args.warm - 1.0, 1e-9)
    back = next((float(e.get("assign_s") or 0) for e in evs
                 if e["event"] == "substituted" and e["name"] == name), None)
    if back is None:
        back = next((float(e["t"]) - wall_kill for e in evs
                     if e["event"] == "serving" and e["name"] == name and e.get("after_s")),
                    float("nan"))
    recover = float("nan")
    ends = sorted(o.end for o in load.outcomes if o.ok and o.end > t_kill)
    win = max(2.0, 4.0 / max(rps, 1e-9))  # long enough to hold a few completions
    for i, t in enumerate(ends):  # first window at >= 90% of the baseline rate
        j = i
        while j < len(ends) and ends[j] < t + win:
            j += 1
        if j - i >= 0.9 * rps * win:
            recover = max(0.0, t - t_kill)
            break
    after = [o for o in load.outcomes if o.end >= t_kill - 0.5]
    statuses = Counter(o.status for o in after if not o.ok)
    failed = [o for o in after if not o.ok and o.status != "HUNG"]
    return Result(fault, mode, run, rps, sum(o.ok for o in after),
                  sum(o.start < t_kill for o in failed), sum(o.start >= t_kill for o in failed),
                  statuses["HUNG"], dict(statuses), back, recover, held,
                  [round(o.end - t_kill, 3) for o in load.outcomes if o.ok],
                  [round(o.end - t_kill, 3) for o in load.outcomes if not o.ok])


def spread(xs: list[float]) -> str:
    xs = [x for x in xs if x == x]
    if not xs:
        return "n/a"
    return f"{min(xs):.2f} / {statistics.median(xs):.2f} / {max(xs):.2f}"


def report(results: list[Result]) -> None:
    print("\nfault     mode     lost in flight      refused while down   hung  "
          "back_s (min/med/max)   recover_s (min/med/max)   kv_held")
    keys = sorted({(r.fault, r.mode) for r in results}, key=lambda k: (FAULTS.index(k[0]), k[1]))
    for f, m in keys:
        rs = [r for r in results if (r.fault, r.mode) == (f, m)]
        print(f"{f:9} {m:8} {spread([r.lost for r in rs]):19} "
              f"{spread([r.refused for r in rs]):20} {max(r.hung for r in rs):4}  "
              f"{spread([r.back_s for r in rs]):22} {spread([r.recover_s for r in rs]):25} "
              f"{max(r.kv_held for r in rs)}")
        for r in rs:
            if r.statuses:
                print(f"    run {r.run}: {r.statuses} (baseline {r.baseline_rps:.1f} req/s, "
                      f"{r.ok} ok after the kill)")


def plot(results: list[Result], path: str) -> None:
    """Completions per second around the kill, per fault and mode (first run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ((f, m) for f in FAULTS for m in ("restart", "spare"))
            if any((r.fault, r.mode) == k for r in results)]
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 1.8 * len(keys)), sharex=True,
                             squeeze=False)
    for ax, (f, m) in zip(axes[:, 0], keys, strict=True):
        r = next(r for r in results if (r.fault, r.mode) == (f, m))
        lo = int(min(r.ok_at + r.failed_at + [0.0])) - 1
        hi = int(max(r.ok_at + r.failed_at + [0.0])) + 1
        edges = list(range(lo, hi + 1))
        ax.hist(r.ok_at, bins=edges, color="tab:blue", label="completed")
        ax.hist(r.failed_at, bins=edges, color="tab:red", alpha=0.7, label="error status")
        ax.axvline(0, color="k", lw=1)
        if r.back_s == r.back_s:
            ax.axvline(r.back_s, color="tab:green", ls="--", lw=1, label="replacement SERVING")
        ax.axhline(r.baseline_rps, color="gray", ls=":", lw=1, label="pre-kill rate")
        ax.set_ylabel("req/s")
        ax.set_title(f"SIGKILL {f} ({m}): lost {r.lost}, hung {r.hung}, back {r.back_s:.2f}s",
                     fontsize=9)
    axes[0, 0].legend(fontsize=7, loc="upper left")
    axes[-1, 0].set_xlabel("seconds since the kill")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: restart mode, short phases")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--faults", default=",".join(FAULTS))
    ap.add_argument("--modes", default="restart,spare")
    ap.add_argument("--trace", default=str(AZURE_CODE))
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=24)
    ap.add_argument("--profile", default="smollm2-cpu")
    ap.add_argument("--prefill", type=int, default=2)
    ap.add_argument("--decode", type=int, default=2)
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--warm", type=float, default=8.0)
    ap.add_argument("--after", type=float, default=15.0)
    ap.add_argument("--settle", type=float, default=3.0)
    ap.add_argument("--client-timeout", type=float, default=60.0)
    ap.add_argument("--json")
    ap.add_argument("--plot", help="PNG of completions per second around each kill")
    args = ap.parse_args()
    if args.quick:
        args.modes, args.warm, args.after, args.users = "restart", 5.0, 8.0, 4
    items = [TraceRequest(0, max(8, min(r.prompt_len, args.max_prompt)),
                          max(2, min(r.output_len, args.max_output)))
             for r in load_trace(args.trace)[:500]]
    from services.engine.prepare import ensure_prepared

    ensure_prepared(f"mock:{args.profile}")
    results: list[Result] = []
    for run in range(args.runs):
        for mode in args.modes.split(","):
            for fault in args.faults.split(","):
                if mode == "spare" and fault not in ("prefill", "decode"):
                    continue
                print(f"run {run}: kill {fault} ({mode}) ...", flush=True)
                r = asyncio.run(scenario(fault, mode, run, args, items))
                print(f"  lost {r.lost}, refused {r.refused} {r.statuses}, hung {r.hung}, "
                      f"back {r.back_s:.2f}s, "
                      f"recover {r.recover_s:.2f}s, kv_held {r.kv_held}", flush=True)
                results.append(r)
    report(results)
    if args.plot:
        plot(results, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in results], indent=1))
    return 0 if all(r.hung == 0 and r.kv_held == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
