"""HTTP door vs gRPC on the same requests: what the OpenAI-compatible door adds.

One `pdserve up` cluster per engine; the baseline is its own gRPC door, measured in the
same run, interleaved with the HTTP door round by round (gRPC, HTTP, gRPC, ...):

  * instant: ``--engine mock --profile bench/profiles/instant.json`` (every modelled
    latency 0, KV bytes still move), so the doors' own cost is most of what is timed;
  * smollm2: the real model on torch.

Each round sends the same requests (prompt token ids, greedy) through both doors at
concurrency c=1 (TTFT p50: send -> first token, no queueing) and c=8 (req/s and TTFT
p50 under load). The clients are as thin as each protocol allows, so the servers are
what is compared: grpc.aio for gRPC, and for HTTP a keep-alive HTTP/1.1 connection per
worker on asyncio streams, POSTing a streaming /v1/completions and reading the SSE
chunks. Also checked: both doors return the same tokens' text.

Target (issue 14): HTTP adds <= 1 ms TTFT p50 over gRPC. A run reports the added p50 at
c=1 and c=8 and the req/s ratio at c=8; ``--runs`` runs give min/median/max.

  python bench/http_vs_grpc.py [--quick] [--runs 3] [--engines instant,smollm2]
         [--requests N] [--json FILE] [--trace PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from bench.common import UpCluster, free_port, prompt_ids  # noqa: E402
from pdserve.v1 import generation_service_pb2 as gen_pb  # noqa: E402
from pdserve.v1 import generation_service_pb2_grpc as gen_grpc  # noqa: E402

INSTANT = ROOT / "bench" / "profiles" / "instant.json"
VOCAB = 49152


@dataclass
class Cell:
    door: str
    concurrency: int
    ttft_p50_ms: float
    ttft_p99_ms: float
    req_per_s: float


@dataclass
class EngineResult:
    engine: str
    runs: list[dict[str, float]] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    same_text: bool = True


class HttpConn:
    """One keep-alive HTTP/1.1 connection; reads a chunked SSE response to [DONE]."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post_stream(self, path: str, body: bytes) -> tuple[float, str]:
        """(seconds to the first data event, the streamed text)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        t0 = time.perf_counter()
        self.writer.write(b"POST " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: "
                          + str(len(body)).encode() + b"\r\n\r\n" + body)
        status = await self.reader.readline()
        if b" 200 " not in status:
            raise RuntimeError(f"HTTP {status!r}")
        while (await self.reader.readline()) not in (b"\r\n", b""):
            pass  # headers (uvicorn streams with Transfer-Encoding: chunked)
        first = 0.0
        text = []
        buf = b""
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            chunk = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            buf += chunk[:-2]
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                data = event.removeprefix(b"data: ")
                if data == b"[DONE]":
                    continue
                if not first:
                    first = time.perf_counter() - t0
                for ch in json.loads(data)["choices"]:
                    text.append(ch.get("text") or "")
        return first, "".join(text)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            await self.writer.wait_closed()


async def _drive(door: str, address: str, http_port: int, prompts: list[list[int]],
                 max_tokens: int, concurrency: int) -> tuple[list[float], float, list[str]]:
    """Send every prompt through one door with ``concurrency`` workers."""
    ttfts: list[float] = []
    texts = [""] * len(prompts)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(prompts)):
        queue.put_nowait(i)
    channel = grpc.aio.insecure_channel(address)
    stub = gen_grpc.GenerationServiceStub(channel)

    async def grpc_worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            t0 = time.perf_counter()
            first = 0.0
            parts = []
            async for msg in stub.Generate(gen_pb.GenerateRequest(
                    prompt_token_ids=prompts[i], max_tokens=max_tokens), timeout=600):
                if not first and msg.token_ids:
                    first = time.perf_counter() - t0
                parts.append(msg.text)
            ttfts.append(first)
            texts[i] = "".join(parts)

    async def http_worker() -> None:
        conn = HttpConn("127.0.0.1", http_port)
        try:
            while not queue.empty():
                i = queue.get_nowait()
                body = json.dumps({"prompt": prompts[i], "max_tokens": max_tokens,
                                   "temperature": 0, "stream": True}).encode()
                first, texts[i] = await conn.post_stream("/v1/completions", body)
                ttfts.append(first)
        finally:
            await conn.close()

    worker = grpc_worker if door == "grpc" else http_worker
    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    await channel.close()
    return ttfts, len(prompts) / elapsed, texts


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] * 1e3


async def measure(engine: str, runs: int, n: int, max_tokens: int, prompt_len: int,
                  rounds: int) -> EngineResult:
    model_args = (["--engine", "mock", "--profile", str(INSTANT)] if engine == "instant"
                  else ["--model", "smollm2"])
    http_port = free_port()
    res = EngineResult(engine)
    with UpCluster("smollm2", extra=[*model_args, "--http-port", str(http_port)]) as up:
        prompts = [prompt_ids(prompt_len, VOCAB, seed=s) for s in range(n)]
        # Warm both doors (connections, code paths, prefix caches stay cold: fresh seeds).
        for door in ("grpc", "http"):
            await _drive(door, up.address, http_port, prompts[:4], max_tokens, 2)
        for run in range(runs):
            per: dict[tuple[str, int], list[tuple[list[float], float]]] = {}
            for r in range(rounds):
                for c in (1, 8):
                    # Fresh prompts per run and round so no door gets a prefix-cache hit.
                    batch = [prompt_ids(prompt_len, VOCAB, seed=1000 * (run + 1) + 100 * r + s)
                             for s in range(n if c == 8 else max(4, n // 4))]
                    outs = {}
                    for door in (("grpc", "http") if r % 2 == 0 else ("http", "grpc")):
                        ttfts, rps, texts = await _drive(door, up.address, http_port, batch,
                                                         max_tokens, c)
                        per.setdefault((door, c), []).append((ttfts, rps))
                        outs[door] = texts
                    res.same_text &= outs["grpc"] == outs["http"]
            summary: dict[str, float] = {}
            for (door, c), samples in per.items():
                ttfts = [t for s, _ in samples for t in s]
                rps = statistics.median(x for _, x in samples)
                res.cells.append(Cell(door, c, _pct(ttfts, 0.5), _pct(ttfts, 0.99), rps))
                summary[f"{door}_c{c}_ttft_p50_ms"] = _pct(ttfts, 0.5)
                summary[f"{door}_c{c}_req_per_s"] = rps
            for c in (1, 8):
                summary[f"added_ttft_p50_ms_c{c}"] = (summary[f"http_c{c}_ttft_p50_ms"]
                                                      - summary[f"grpc_c{c}_ttft_p50_ms"])
            summary["req_per_s_ratio_c8"] = summary["http_c8_req_per_s"] / \
                summary["grpc_c8_req_per_s"]
            res.runs.append(summary)
            print(f"  {engine} run {run + 1}: added TTFT p50 c=1 "
                  f"{summary['added_ttft_p50_ms_c1']:+.2f} ms "
                  f"(gRPC {summary['grpc_c1_ttft_p50_ms']:.2f} ms), c=8 "
                  f"{summary['added_ttft_p50_ms_c8']:+.2f} ms; req/s c=8 HTTP "
                  f"{summary['http_c8_req_per_s']:.1f} vs gRPC "
                  f"{summary['grpc_c8_req_per_s']:.1f} "
                  f"(x{summary['req_per_s_ratio_c8']:.3f})", flush=True)
    return res


def _spread(xs: list[float]) -> str:
    return f"min {min(xs):+.2f} / median {statistics.median(xs):+.2f} / max {max(xs):+.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: instant only, 1 run")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--engines", default="instant,smollm2")
    ap.add_argument("--requests", type=int, default=0,
                    help="requests per door per c=8 round (0: per engine default)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per run")
    ap.add_argument("--json", default="", help="write the results here")
    ap.add_argument("--trace", default="", help="unused: the requests are synthetic "
                    "(fixed prompt and output lengths), accepted for bench uniformity")
    args = ap.parse_args()
    engines = ["instant"] if args.quick else args.engines.split(",")
    runs = 1 if args.quick else args.runs
    target_ms = 1.0
    out: list[EngineResult] = []
    for engine in engines:
        n = args.requests or (64 if engine == "instant" else 16)
        max_tokens = 16 if engine == "instant" else 8
        prompt_len = 64 if engine == "instant" else 128
        print(f"{engine}: {runs} run(s), {n} requests per door per c=8 round, prompt "
              f"{prompt_len} tokens, {max_tokens} new", flush=True)
        res = asyncio.run(measure(engine, runs, n, max_tokens, prompt_len, args.rounds))
        out.append(res)
        for c in (1, 8):
            xs = [r[f"added_ttft_p50_ms_c{c}"] for r in res.runs]
            met = all(x <= target_ms for x in xs)
            print(f"{engine}: HTTP adds TTFT p50 at c={c}: {_spread(xs)} ms "
                  f"(target <= {target_ms} ms: {'met' if met else 'NOT met'} in "
                  f"{sum(x <= target_ms for x in xs)}/{len(xs)} runs)")
        ratios = [r["req_per_s_ratio_c8"] for r in res.runs]
        print(f"{engine}: req/s at c=8, HTTP/gRPC: min {min(ratios):.3f} / median "
              f"{statistics.median(ratios):.3f} / max {max(ratios):.3f}; same text on both "
              f"doors: {res.same_text}")
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in out], indent=2))
    return 0 if all(r.same_text for r in out) else 1


if __name__ == "__main__":
    sys.exit(main())
