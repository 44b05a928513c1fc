"""The fuzz properties of tests/faults/fuzzing.py at scale, on a real-process cluster
(tiny model): hypothesis GenerateRequests through the public API and hostile frames on the
kvstore's raw data port; then: every process alive, nothing held, still serving.

  .venv/bin/python bench/fuzz.py                 2,000 API + 1,000 data-port examples
  .venv/bin/python bench/fuzz.py --quick         200 + 60 (the CI size)
  .venv/bin/python bench/fuzz.py --api 5000 --json out.json

The baseline measured in the same run is the example rate of plain valid requests (no
fuzzing) against the fuzzed rate. ``--trace`` is accepted for the common bench interface
and ignored (the inputs are generated).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, given, settings

from pdserve.v1 import generation_service_pb2
from tests.faults.fuzzing import ApiOracle, Tally, any_requests, data_frames, poke_data_port
from tests.faults.harness import ProcCluster, generate


def data_port(c: ProcCluster) -> int:
    from services.cluster.registry import connect, list_instances

    async def find() -> str:
        client = connect(c.redis.url)
        try:
            found = await list_instances(client, c.group)
        finally:
            await client.aclose()
        return next(i.data_address for i in found if i.role == "kvstore")

    return int(asyncio.run(find()).rpartition(":")[2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 API + 60 data-port examples")
    ap.add_argument("--api", type=int, default=0, help="API examples (default 2000)")
    ap.add_argument("--data", type=int, default=0, help="data-port examples (default 1000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default="")
    ap.add_argument("--trace", default="", help="ignored (generated inputs)")
    args = ap.parse_args(argv)
    n_api = args.api or (200 if args.quick else 2000)
    n_data = args.data or (60 if args.quick else 1000)
    tally = Tally()
    base = settings(deadline=None, database=None, derandomize=False,
                    suppress_health_check=list(HealthCheck))
    with tempfile.TemporaryDirectory(prefix="pdserve-fuzz-") as tmp:
        c = ProcCluster(Path(tmp), prefills=1, decodes=1, gateways=1,
                        env={"PDSERVE_DEFAULT_MAX_TOKENS": "8"}, proc_env={})
        try:
            c.start()
            gw = c.procs["gateway-0"].address
            oracle = ApiOracle("tiny", default_max_tokens=8)
            t0 = time.monotonic()
            for i in range(50):  # the baseline: plain valid requests
                generate(gw, 30, prompt_token_ids=[5 + i % 50, 6, 7], max_tokens=4)
            base_rate = 50 / (time.monotonic() - t0)

            @settings(base, max_examples=n_api)
            @given(req=any_requests())
            def api(req: generation_service_pb2.GenerateRequest) -> None:
                oracle.check(gw, req, tally)

            t0 = time.monotonic()
            api()
            api_s = time.monotonic() - t0
            host = c.procs["kvstore"].address.rpartition(":")[0]
            port = data_port(c)

            @settings(base, max_examples=n_data)
            @given(frame=data_frames())
            def data(frame: bytes) -> None:
                poke_data_port(host, port, frame, tally)

            t0 = time.monotonic()
            data()
            data_s = time.monotonic() - t0
            alive = sorted(c.alive()) == sorted(c.procs)
            held = c.settled_kv(2.0)
            serving = c.probe()
        finally:
            c.stop()
    api_n = sum(v for k, v in tally.counts.items() if not k.startswith("data:"))
    data_n = sum(v for k, v in tally.counts.items() if k.startswith("data:"))
    out = {"api_examples": api_n, "data_examples": data_n, "outcomes": dict(tally.counts),
           "all_alive": alive, "kv_held_after": held, "serving_after": serving,
           "api_examples_per_s": round(api_n / api_s, 1),
           "baseline_valid_requests_per_s": round(base_rate, 1),
           "data_examples_per_s": round(data_n / data_s, 1)}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0 if alive and held == 0 and serving else 1


if __name__ == "__main__":
    sys.exit(main())
