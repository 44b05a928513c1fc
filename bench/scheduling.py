"""Scheduling bench: TTFT-SLO success against load, for each prefill policy.

One mock cluster (``pdserve up --engine mock``: >= 8 prefills, >= 4 decodes over two
scenario groups, b_p = 1) serves all policies: one gateway per policy runs against
the same workers (prefill admission is chosen per request). For each trace, policy
and load, the bench replays a sample of the trace and reports TTFT p50/p99, mean
TPOT, goodput (requests/s that met the TTFT SLO) and the TTFT-SLO success rate.

  open loop:   arrivals at trace timestamps divided by the load factor
  closed loop: ``load`` users, each sending its next request when the last ends

TTFT SLO per request (the paper's thresholds differ with prompt length):
  slo_ms = slo_factor * profile.prefill_ms(prompt_len) * time_scale + slo_floor_ms
Requests carry it as their TTFT deadline, so every policy gets early intervention.

  python bench/scheduling.py --quick
  python bench/scheduling.py --trace bench/data/azure_llm_2023_code.csv --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import UpCluster, free_port
from bench.report import POLICIES, Point, percentile, plot, sample, write_json
from bench.traces import AZURE_CODE, MOONCAKE, TraceRequest, load_trace, paper_example, prompt_ids
from pdserve.v1 import generation_service_pb2, generation_service_pb2_grpc

GROUPS = ("g0", "g1")
ERRORS: dict[str, int] = {}  # status code -> count, over the whole run


@dataclass
class Outcome:
    ok: bool
    ttft_s: float
    tpot_s: float
    slo_met: bool


async def one(stub: generation_service_pb2_grpc.GenerationServiceStub, ids: list[int],
              out_len: int, group: str, slo_ms: float) -> Outcome:
    t0 = time.monotonic()
    times: list[float] = []
    try:
        async for msg in stub.Generate(generation_service_pb2.GenerateRequest(
                prompt_token_ids=ids, max_tokens=max(1, out_len), scenario=group,
                ttft_deadline_ms=int(slo_ms)), timeout=600):
            if msg.token_ids:
                times.extend([time.monotonic()] * len(msg.token_ids))
    except grpc.aio.AioRpcError as e:
        ERRORS[e.code().name] = ERRORS.get(e.code().name, 0) + 1
        if os.environ.get("PDSERVE_BENCH_DEBUG"):
            print(f"error: {e.code().name}: {e.details()}", file=sys.stderr)
        return Outcome(False, float("nan"), float("nan"), False)
    ttft = times[0] - t0
    tpot = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else 0.0
    return Outcome(True, ttft, tpot, ttft * 1000 <= slo_ms)


async def replay(address: str, reqs: list[TraceRequest], load: float, mode: str,
                 vocab: int, slo: list[float], time_scale: float,
                 progress, salt: int = 0,  # type: ignore[no-untyped-def]
                 ) -> tuple[list[Outcome], float]:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        prompts = [prompt_ids(r, i, vocab, salt) for i, r in enumerate(reqs)]
        t0 = time.monotonic()
        results: list[Outcome | None] = [None] * len(reqs)

        async def run(i: int) -> None:
            results[i] = await one(stub, prompts[i], reqs[i].output_len, GROUPS[i % 2], slo[i])
            progress.update(1)

        if mode == "open":
            base = reqs[0].arrival_s
            tasks = []
            for i, r in enumerate(reqs):
                delay = (r.arrival_s - base) * time_scale / load - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(run(i)))
            await asyncio.gather(*tasks)
        else:
            it = iter(range(len(reqs)))

            async def user() -> None:
                for i in it:
                    await run(i)

            await asyncio.gather(*(user() for _ in range(int(load))))
        return [r for r in results if r is not None], time.monotonic() - t0


def summarise(trace: str, policy: str, load: float, res: list[Outcome], wall: float) -> Point:
    ttfts = [r.ttft_s * 1e3 for r in res if r.ok]
    tpots = [r.tpot_s * 1e3 for r in res if r.ok and r.tpot_s > 0]
    met = sum(r.slo_met for r in res)
    return Point(trace, policy, load, len(res), met / len(res), percentile(ttfts, 0.5),
                 percentile(ttfts, 0.99), statistics.fmean(tpots) if tpots else 0.0,
                 met / wall)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--trace", action="append", help="trace file (.csv Azure / .jsonl Mooncake) "
                    "or 'paper'; default: both shared traces and the paper example")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--loads", default="", help="comma list of load factors")
    ap.add_argument("--mode", choices=("open", "closed"), default="open")
    ap.add_argument("--requests", type=int, default=200, help="requests per point")
    ap.add_argument("--profile", default="scaled-gpu")
    ap.add_argument("--prefill", type=int, default=8, help="prefills (split over 2 groups)")
    ap.add_argument("--decode", type=int, default=4, help="decodes (split over 2 groups)")
    ap.add_argument("--slo-factor", type=float, default=4.0)
    ap.add_argument("--slo-floor-ms", type=float, default=300.0)
    ap.add_argument("--max-prompt", type=int, default=16384)
    ap.add_argument("--time-scale", type=float, default=3.0,
                    help="stretch the modelled times so this 2-core machine's fixed per-request "
                         "costs (gRPC, moving the KV bytes) stay small next to them; SLOs and "
                         "arrival rates scale with it")
    ap.add_argument("--quick", action="store_true", help="small sweep, a few minutes")
    ap.add_argument("--out-dir", default="bench/out")
    ap.add_argument("--json", help="write {trace: {policy: [points]}} here")
    ap.add_argument("--sim", action="store_true",
                    help="drive the same policy code in the discrete-event simulator "
                         "(bench/simulator.py) instead of the live mock cluster")
    args = ap.parse_args()
    if args.sim:
        from bench.scheduling_sim import run_sim

        return run_sim(args)
    from tqdm import tqdm

    from services.engine.mock import LatencyModel
    from services.engine.prepare import ensure_prepared
    from services.model.info import ModelInfo
    from services.model.profile import profile_path

    if args.quick:
        args.requests = min(args.requests, 60)
    traces = args.trace or [str(AZURE_CODE),
                            str(MOONCAKE), "paper"]
    loads = [float(x) for x in args.loads.split(",")] if args.loads else (
        [2.0, 6.0, 12.0] if args.quick else [1.0, 2.0, 4.0, 8.0, 12.0, 16.0])
    policies = [p for p in args.policies.split(",") if p]
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prof = json.loads(profile_path(args.profile).read_text())
    prof["time_scale"] = scale = float(prof.get("time_scale", 1.0)) * args.time_scale
    profile_file = (out_dir / f"profile-{Path(args.profile).stem}.json").resolve()
    profile_file.write_text(json.dumps(prof, indent=2))
    args.profile = str(profile_file)
    latency = LatencyModel.from_profile(prof)
    ensure_prepared(f"mock:{args.profile}")
    vocab = ModelInfo.load(f"mock:{args.profile}").vocab_size
    half_p, half_d = max(1, args.prefill // 2), max(1, args.decode // 2)
    groups = f"{GROUPS[0]}:{half_p}p{half_d}d,{GROUPS[1]}:{half_p}p{half_d}d"
    # 100 ms load reports (the paper's period, for reported-queue). The KV bytes still move
    # for real; the crc32 over them is off here because it only burns the shared 2 cores.
    env = {"PDSERVE_HEARTBEAT_S": "0.1", "PDSERVE_REGISTRY_TTL_S": "2.0",
           "PDSERVE_KV_CHECKSUM": "0"}
    points: list[Point] = []
    salts = itertools.count(1)  # fresh prompts per replay: no prefix-cache hits across runs
    cluster = UpCluster(f"mock:{args.profile}", extra=["--engine", "mock", "--profile",
                        args.profile, "--groups", groups, "--slots", "1"], env=env)
    cluster.wait()
    gateways: dict[str, str] = {"forward": cluster.address}
    extra_procs = []
    try:
        redis_url = next(line.split("redis ")[-1] for line in cluster.read().splitlines()
                         if "redis unix" in line or "redis redis" in line)
        # The workers refuse internal RPCs without the cluster's token (pdserve up writes it).
        token = (cluster.log_dir / "cluster-token").read_text().strip()
        env = {**env, "PDSERVE_CLUSTER_TOKEN": token}
        for policy in policies:
            if policy == "forward":
                continue
            port = free_port()
            extra_procs.append(subprocess_gateway(policy, port, redis_url, args.profile, env))
            gateways[policy] = f"127.0.0.1:{port}"
        wait_serving(list(gateways.values()))
        # Warm every gateway and worker path first: the first requests after start-up pay
        # for connections and allocations, and would count against whichever policy ran first.
        warm = [TraceRequest(i * 0.05, 256 + 64 * i, 4) for i in range(16)]
        for address in gateways.values():
            asyncio.run(replay(address, warm, 1.0, "open", vocab, [60_000.0] * len(warm),
                               1.0, _NullBar(), salt=next(salts)))
        for trace in traces:
            reqs = paper_example() if trace == "paper" else load_trace(trace)
            name = "paper" if trace == "paper" else Path(trace).stem
            reqs = sample(reqs, args.requests if trace != "paper" else
                          min(args.requests, 80), args.max_prompt)
            slo = [args.slo_factor * latency.prefill_ms(r.prompt_len) * scale + args.slo_floor_ms
                   for r in reqs]
            bar = tqdm(total=len(policies) * len(loads) * len(reqs), desc=name, unit="req")
            for k, load in enumerate(loads):
                # Rotate the order per load so slow drift on the machine is spread evenly.
                for policy in policies[k % len(policies):] + policies[:k % len(policies)]:
                    res, wall = asyncio.run(replay(gateways[policy], reqs, load, args.mode,
                                                   vocab, slo, scale, bar, next(salts)))
                    pt = summarise(name, policy, load, res, wall)
                    points.append(pt)
                    bar.write(f"{name:28} {policy:15} load {load:6.1f}: SLO success "
                              f"{100 * pt.ttft_slo_success:5.1f}% | TTFT p50 {pt.ttft_p50_ms:7.0f}"
                              f" p99 {pt.ttft_p99_ms:7.0f} ms | goodput {pt.goodput_rps:6.2f}/s")
            bar.close()
    finally:
        for p in extra_procs:
            p.terminate()
            p.wait(30)
        cluster.stop()
    with open(out_dir / "scheduling.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(asdict(points[0]).keys()))
        w.writeheader()
        w.writerows(asdict(p) for p in points)
    for path in plot(points, out_dir):
        print(f"plot: {path}")
    if args.json:
        write_json(points, Path(args.json))
    print(f"csv: {out_dir / 'scheduling.csv'}; errors by status: {ERRORS or 'none'}")
    return 0


class _NullBar:
    def update(self, n: int) -> None:
        pass


def subprocess_gateway(policy: str, port: int, redis_url: str, profile: str,
                       env: dict[str, str]):  # type: ignore[no-untyped-def]
    import subprocess

    return subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--port", str(port), "--scheduler", policy,
         "--model", f"mock:{profile}", "--group", GROUPS[0], "--instance-id",
         f"gateway-{policy}", "--registry-poll-s", "0.1",
         "--http-port", "-1"],  # no HTTP door: all would bind 8000
        env={**os.environ, **env, "PDSERVE_REDIS_URL": redis_url},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_serving(addresses: list[str], timeout_s: float = 60) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout_s
    for addr in addresses:
        while True:
            try:
                with grpc.insecure_channel(addr) as ch:
                    r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                             timeout=1)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"gateway {addr} not SERVING")
            time.sleep(0.2)


if __name__ == "__main__":
    sys.exit(main())
