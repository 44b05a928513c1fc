"""The static ratio sweep on a live ``pdserve up --engine mock`` cluster (small scale):
one cluster per split, real processes, gRPC, Redis and KV bytes; closed loop.

Called by ``bench/ratio_sweep.py --live``. The live workload is ``chat`` with answers
halved (``--live-output-scale``), so that a 6-instance sweep finishes in minutes on
2 cores; times are stretched by ``--time-scale`` (as in bench/scheduling.py) so that
the machine's fixed per-request costs stay small next to the modelled ones, and SLOs
stretch with them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from pathlib import Path

import grpc

from bench.common import UpCluster
from bench.ratio_common import Item, Point, Slo, Summary, predicted, summarise, workload
from bench.traces import TraceRequest, prompt_ids
from pdserve.v1 import generation_service_pb2, generation_service_pb2_grpc
from services.control.perfmodel import Deployment, best_split, sweep
from services.engine.mock import LatencyModel


async def one(stub: generation_service_pb2_grpc.GenerationServiceStub, ids: list[int],
              out_len: int, ttft_slo_ms: float) -> tuple[bool, float, float, float]:
    """(ok, ttft_ms, e2e_ms, end monotonic s)."""
    t0 = time.monotonic()
    first = 0.0
    n = 0
    try:
        async for msg in stub.Generate(generation_service_pb2.GenerateRequest(
                prompt_token_ids=ids, max_tokens=out_len, scenario="g0",
                ttft_deadline_ms=int(ttft_slo_ms)), timeout=600):
            if msg.token_ids and not first:
                first = time.monotonic()
            n += len(msg.token_ids)
    except grpc.aio.AioRpcError:
        return False, math.nan, math.nan, time.monotonic()
    end = time.monotonic()
    return n >= out_len, (first - t0) * 1e3, (end - t0) * 1e3, end


async def closed_loop(address: str, items: list[Item], users: int, vocab: int, slo: Slo,
                      lat: LatencyModel, scale: float, salt: int) -> tuple[float, float]:
    """(goodput req/s over the middle 80% of completions, share meeting both SLOs)."""
    done: list[tuple[bool, float]] = []  # (met, end)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        it = iter(range(len(items)))

        async def user() -> None:
            for i in it:
                q = items[i]
                ids = prompt_ids(TraceRequest(0, q.prompt_len, q.output_len), i, vocab, salt)
                ttft_slo = (slo.factor * lat.prefill_ms(q.prompt_len) * scale + slo.floor_ms)
                ok, ttft, e2e, end = await one(stub, ids, q.output_len, ttft_slo)
                met = ok and ttft <= ttft_slo and e2e <= ttft_slo + \
                    q.output_len * slo.tpot_ms * scale
                done.append((met, end))

        await asyncio.gather(*(user() for _ in range(users)))
    ends = sorted(e for _, e in done)
    lo, hi = ends[len(ends) // 10], ends[(9 * len(ends)) // 10]
    met = sum(1 for m, e in done if m and lo <= e < hi)
    return (met / (hi - lo) if hi > lo else 0.0), sum(m for m, _ in done) / len(done)


def live_sweep(names: list[str], lat: LatencyModel, args: argparse.Namespace,
               slo: Slo) -> tuple[list[Point], list[Summary]]:
    from services.engine.prepare import ensure_prepared
    from services.model.info import ModelInfo
    from services.model.profile import profile_path

    scale = args.time_scale
    prof_raw = json.loads(profile_path(args.profile).read_text())
    prof_raw["time_scale"] = float(prof_raw.get("time_scale", 1.0)) * scale
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pfile = (out_dir / "profile-ratio-live.json").resolve()
    pfile.write_text(json.dumps(prof_raw, indent=2))
    ensure_prepared(f"mock:{pfile}")
    vocab = ModelInfo.load(f"mock:{pfile}").vocab_size
    n = args.live_instances
    points: list[Point] = []
    sums: list[Summary] = []
    env = {"PDSERVE_HEARTBEAT_S": "0.2", "PDSERVE_KV_CHECKSUM": "0",
           "PDSERVE_SLOTS": str(args.live_decode_slots),  # decodes' b_d (prefills: --slots 1)
           "PDSERVE_KV_POOL_TOKENS": str(args.live_kv_pool_tokens)}
    live_names = [w for w in names if w in ("chat", "chat-long", "code")] or ["chat"]
    for name in live_names:
        for run in range(args.runs):
            items = [Item(i.prompt_len, max(2, int(i.output_len * args.live_output_scale)))
                     for i in workload(name, args.live_requests, seed=run)]
            dep = Deployment(prefill_slots=1, decode_slots=args.live_decode_slots,
                             kv_pool_tokens=args.live_kv_pool_tokens, prefill_parallel=False)
            model = predicted(lat, items, dep)
            pred = best_split(model, n, floor=1)
            e2e_s = model.e2e_ms * scale / 1000.0
            users = max(4, math.ceil(args.users_factor * pred.capacity / scale * e2e_s))
            caps = {s.n_p: s.capacity / scale for s in sweep(model, n, floor=1)}
            pts = []
            for n_p in range(1, n):
                cluster = UpCluster(f"mock:{pfile}", extra=[
                    "--engine", "mock", "--profile", str(pfile), "--groups",
                    f"g0:{n_p}p{n - n_p}d", "--slots", "1"], env=env)
                try:
                    cluster.wait()
                    warm = [Item(64, 4)] * 4
                    asyncio.run(closed_loop(cluster.address, warm, 2, vocab, Slo(1e6, 1e6, 1e6),
                                            lat, scale, salt=10_000 + n_p))
                    gp, share = asyncio.run(closed_loop(cluster.address, items, users, vocab,
                                                        slo, lat, scale, salt=100 * run + n_p))
                finally:
                    cluster.stop()
                p = Point(name, run, n_p, n - n_p, gp, share, caps[n_p])
                print(f"live {name} run {run} P{n_p}/D{n - n_p}: goodput {gp:.2f} req/s, "
                      f"SLO share {100 * share:.0f}% ({users} users)", flush=True)
                pts.append(p)
            points += pts
            sums.append(summarise(name, run, pts, pred.n_p, users, args.live_decode_slots))
    return points, sums
