"""Role switching under load on the live mock cluster.

``pdserve up --engine mock --switchable`` (2 prefill + 2 decode workers) serves a closed
loop of ``--users`` clients replaying the trace. Phase A (the baseline of the same run)
runs ``--phase`` seconds without switches; phase B runs as long while, every
``--every`` seconds, one worker switches role over WorkerControlService and later
switches back (decode-1 -> prefill -> decode, prefill-1 -> decode -> prefill, in turn:
each role keeps >= 1 instance). Then a cold start is timed: a new worker process of
the same settings, from spawn until it answers SERVING (what a switch avoids).

Reported (min/median/max over the switches and over ``--runs``):
  - switch_ms = drain_ms + load_ms (WorkerStatus), and whether the weights and the
    paged pool were kept; the ratio switch / cold start;
  - requests in phase B: ok, failed (by status), hung; ended by a drain (INSTANCE_DRAINED)
    must be 0 with the default drain timeout;
  - E2E p50 and throughput in B against A.

  python bench/role_switch.py --quick
  python bench/role_switch.py --runs 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import UpCluster
from bench.substitution import Load, Outcome
from bench.traces import AZURE_CODE, TraceRequest, load_trace
from pdserve.v1 import admin_service_pb2 as apb
from pdserve.v1 import admin_service_pb2_grpc as apb_grpc


@dataclass
class Switch:
    instance: str
    to: str
    drain_ms: float
    load_ms: float
    switch_ms: float
    weights_kept: bool
    pool_kept: bool
    aborted: int


@dataclass
class Run:
    run: int
    switches: list[Switch]
    cold_start_ms: float
    a_ok: int
    b_ok: int
    b_failed: dict[str, int]
    b_hung: int
    a_e2e_p50_ms: float
    b_e2e_p50_ms: float
    a_rps: float
    b_rps: float


def address(up: UpCluster, name: str) -> str:
    return str(json.loads((up.log_dir / f"{name}.ready.json").read_text())["address"])


async def switch(up: UpCluster, name: str, role: str) -> Switch:
    token = (up.log_dir / "cluster-token").read_text().strip()  # workers require it
    async with grpc.aio.insecure_channel(address(up, name)) as ch:
        st = await apb_grpc.WorkerControlServiceStub(ch).Assign(
            apb.AssignRequest(role=role, group="default"), timeout=300,
            metadata=[("x-pdserve-cluster-token", token)])
    return Switch(name, role, st.last_drain_ms, st.last_load_ms, st.last_switch_ms,
                  st.weights_kept, st.pool_kept, st.aborted_on_drain_total)


def cold_start(up: UpCluster, model: str) -> float:
    """ms from spawning a fresh worker (decode, same settings) until SERVING."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    redis = re.search(r"redis (\S+)", up.read())
    assert redis is not None
    tmp = Path(tempfile.mkdtemp(prefix="pdserve-cold-"))
    ready = tmp / "ready.json"
    env = {**os.environ, "PDSERVE_REDIS_URL": redis.group(1), "PDSERVE_MODEL": model,
           "PDSERVE_ROLE": "decode", "PDSERVE_GROUP": "cold-start", "PDSERVE_READY_FILE":
           str(ready), "PDSERVE_INSTANCE_ID": "cold-start", "OMP_WAIT_POLICY": "PASSIVE"}
    t0 = time.monotonic()
    with open(tmp / "log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"cold-start worker exited: {(tmp / 'log').read_text()}")
            if ready.exists():
                addr = json.loads(ready.read_text())["address"]
                with grpc.insecure_channel(addr) as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return (time.monotonic() - t0) * 1e3
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait(30)


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


async def one_run(run: int, args: argparse.Namespace, items: list[TraceRequest]) -> Run:
    extra = ["--switchable", "--http-port", "-1"]
    if args.model.startswith("mock:"):
        extra += ["--engine", "mock", "--profile", args.model.removeprefix("mock:")]
    with UpCluster(args.model, 2, 2, extra=extra, env={"PDSERVE_REDIS_URL": ""}) as up:
        from services.model.info import ModelInfo

        vocab = ModelInfo.load(args.model).vocab_size
        load = Load(up.address, items, args.users, args.client_timeout, vocab)
        task = asyncio.create_task(load.run())
        await asyncio.sleep(1.0)  # warm-up, not measured
        t_a = time.monotonic()
        await asyncio.sleep(args.phase)
        t_b = time.monotonic()
        plan = [("decode-1", "prefill"), ("decode-1", "decode"),
                ("prefill-1", "decode"), ("prefill-1", "prefill")]
        switches: list[Switch] = []
        k = 0
        while time.monotonic() - t_b < args.phase:
            name, role = plan[k % len(plan)]
            switches.append(await switch(up, name, role))
            k += 1
            await asyncio.sleep(args.every)
        while k % 2:  # end with each worker back in its role
            name, role = plan[k % len(plan)]
            switches.append(await switch(up, name, role))
            k += 1
        t_end = time.monotonic()
        load.stop.set()
        await task
        cold = statistics.median(cold_start(up, args.model) for _ in range(2))

    def window(lo: float, hi: float) -> list[Outcome]:
        return [o for o in load.outcomes if lo <= o.start and o.end < hi + args.client_timeout
                and o.start < hi]

    a, b = window(t_a, t_b), window(t_b, t_end)
    failed = Counter(o.status for o in b if not o.ok and o.status != "HUNG")
    return Run(run, switches, cold, sum(o.ok for o in a), sum(o.ok for o in b), dict(failed),
               sum(o.status == "HUNG" for o in b),
               p50([(o.end - o.start) * 1e3 for o in a if o.ok]),
               p50([(o.end - o.start) * 1e3 for o in b if o.ok]),
               sum(o.ok for o in a) / (t_b - t_a), sum(o.ok for o in b) / (t_end - t_b))


def spread(xs: list[float]) -> str:
    return f"{min(xs):.1f} / {statistics.median(xs):.1f} / {max(xs):.1f}" if xs else "n/a"


def report(runs: list[Run]) -> None:
    sw = [s for r in runs for s in r.switches]
    print(f"\n{len(sw)} switches over {len(runs)} run(s) (min / median / max):")
    print(f"  switch_ms {spread([s.switch_ms for s in sw])}   drain_ms "
          f"{spread([s.drain_ms for s in sw])}   load_ms {spread([s.load_ms for s in sw])}")
    print(f"  weights kept {sum(s.weights_kept for s in sw)}/{len(sw)}, pool kept "
          f"{sum(s.pool_kept for s in sw)}/{sum(s.to == 'decode' for s in sw)} of the switches "
          f"to decode, requests ended by a drain: {max((s.aborted for s in sw), default=0)}")
    cold = [r.cold_start_ms for r in runs]
    print(f"  cold start of a new worker process: {spread(cold)} ms; median switch / cold "
          f"start = {statistics.median(s.switch_ms for s in sw) / statistics.median(cold):.3f}")
    print("requests while switching (phase B) against the same run without (phase A):")
    for r in runs:
        print(f"  run {r.run}: B ok {r.b_ok}, failed {r.b_failed or 0}, hung {r.b_hung}; "
              f"E2E p50 B/A {r.b_e2e_p50_ms / r.a_e2e_p50_ms:.2f}, throughput B/A "
              f"{r.b_rps / r.a_rps:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: short phases")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--trace", default=str(AZURE_CODE))
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=24)
    ap.add_argument("--model", default="mock:smollm2-cpu",
                    help="mock:<profile>, or a real model (tiny, smollm2) through torch")
    ap.add_argument("--users", type=int, default=6)
    ap.add_argument("--phase", type=float, default=20.0, help="seconds per phase")
    ap.add_argument("--every", type=float, default=2.0, help="seconds between switches")
    ap.add_argument("--client-timeout", type=float, default=60.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.quick:
        args.phase, args.users = 8.0, 4
    if args.model == "tiny":  # its context is 1024 tokens
        args.max_prompt = min(args.max_prompt, 512)
    items = [TraceRequest(0, max(8, min(r.prompt_len, args.max_prompt)),
                          max(2, min(r.output_len, args.max_output)))
             for r in load_trace(args.trace)[:500]]
    from services.engine.prepare import ensure_prepared

    ensure_prepared(args.model)
    runs = []
    for run in range(args.runs):
        print(f"run {run} ...", flush=True)
        runs.append(asyncio.run(one_run(run, args, items)))
    report(runs)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in runs], indent=1))
    lost = sum(sum(r.b_failed.values()) + r.b_hung for r in runs)
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
