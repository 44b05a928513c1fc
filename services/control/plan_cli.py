"""``pdserve plan``: per group, Eq. 1's best P/D ratio and its bottleneck, for a trace or
a traffic description.

  pdserve plan --trace bench/data/azure_llm_2023_code.csv --groups 2 --instances 12
  pdserve plan --group chat:prompt=1500,output=200,rate=8 --group code:prompt=2000,output=30
  pdserve plan --profile smollm2-cpu --serial-prefill --decode-slots 16 --kv-pool-tokens 32768 ...

The latency profile is a mock-engine profile (built-in name or JSON path), which is also
what ``bench/profile_model.py`` writes for a real model. A trace is split into groups
round robin (as the benches do). For Mooncake-style traces, requests that repeat a
leading block (equal ``hash_ids``) are counted as prefix hits within their group, an
upper bound for a cache that never evicts (``--no-prefix`` to ignore hits).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from services.control.perfmodel import (
    Deployment,
    GroupProfile,
    Split,
    Workload,
    best_split,
    from_latency,
    required,
)

HASH_BLOCK = 512  # tokens per Mooncake hash id


@dataclass(frozen=True)
class Req:
    arrival_s: float
    prompt_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


def read_trace(path: str) -> list[Req]:
    """An Azure-style CSV (TIMESTAMP, ContextTokens, GeneratedTokens) or a Mooncake-style
    JSONL (timestamp ms, input_length, output_length, hash_ids); the formats the shipped
    traces in bench/data use."""
    p = Path(path)
    out: list[Req] = []
    if p.suffix == ".csv":
        t0 = None
        with p.open() as fh:
            for r in csv.DictReader(fh):
                ts = datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp()
                t0 = ts if t0 is None else t0
                out.append(Req(ts - t0, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
        return out
    if p.suffix == ".jsonl":
        with p.open() as fh:
            for line in fh:
                d = json.loads(line)
                out.append(Req(d["timestamp"] / 1000.0, int(d["input_length"]),
                               int(d["output_length"]), tuple(d.get("hash_ids", ()))))
        return out
    raise ValueError(f"{path}: expected an Azure-style .csv or a Mooncake-style .jsonl trace")


def prefix_hits(reqs: list[Req]) -> list[int]:
    """Tokens of each request's leading blocks already seen in the list (no eviction)."""
    seen: set[tuple[int, ...]] = set()
    hits = []
    for r in reqs:
        n = 0
        for k in range(1, len(r.hash_ids) + 1):
            if r.hash_ids[:k] in seen:
                n = k
            else:
                break
        seen.update(r.hash_ids[:k] for k in range(1, len(r.hash_ids) + 1))
        hits.append(min(n * HASH_BLOCK, max(r.prompt_len - 1, 0)))
    return hits


@dataclass(frozen=True)
class GroupPlan:
    group: str
    requests: int
    rate_rps: float
    instances: int
    workload: Workload
    profile: GroupProfile
    best: Split
    needed: Split | None

    def lines(self) -> list[str]:
        w, p, b = self.workload, self.profile, self.best
        out = [f"group {self.group}: {self.requests} requests, prompt {w.prompt_len:.0f}, "
               f"output {w.output_len:.0f}"
               + (f", {self.rate_rps:.2f} req/s" if self.rate_rps > 0 else "")
               + f", r_pre {p.r_pre:.2f}",
               f"  T_p {p.t_p_ms:.0f} ms, T_d {p.t_d_ms:.0f} ms (TPOT_bs {p.tpot_bs_ms:.1f} ms"
               f" at b_d {p.b_d:.0f}, G {p.g:.0f}, xi {p.xi_ms:.1f} ms, b_p {p.b_p:.0f}); "
               f"Eq. 1 n_p:n_d = {p.eq1_ratio():.2f} : 1",
               f"  best of {self.instances}: {b}  capacity {b.capacity:.2f} req/s, "
               f"Phi {b.phi:.3f} req/s/instance, bottleneck {b.bottleneck}, "
               f"E2E {p.e2e_ms / 1000:.2f} s without waiting"]
        if self.needed is not None:
            n = self.needed
            out.append(f"  to carry {self.rate_rps:.2f} req/s: {n} ({n.total} instances, "
                       f"capacity {n.capacity:.2f} req/s)")
        return out


def _parse_group(spec: str) -> tuple[str, dict[str, float]]:
    name, _, rest = spec.partition(":")
    if not name or not rest:
        raise ValueError(f"--group {spec!r}: expected NAME:prompt=P,output=O[,rate=R]"
                         "[,instances=N][,cached=C]")
    kv: dict[str, float] = {}
    for part in rest.split(","):
        k, _, v = part.partition("=")
        if k not in ("prompt", "output", "rate", "instances", "cached"):
            raise ValueError(f"--group {spec!r}: unknown key {k!r}")
        kv[k] = float(v)
    if "prompt" not in kv or "output" not in kv:
        raise ValueError(f"--group {spec!r}: prompt= and output= are required")
    return name, kv


def plan(args: argparse.Namespace) -> list[GroupPlan]:
    from services.engine.mock import LatencyModel
    from services.model.profile import profile_path

    raw: dict[str, Any] = json.loads(profile_path(args.profile).read_text())
    lat = LatencyModel.from_profile(raw)
    dep = Deployment(prefill_slots=args.prefill_slots, decode_slots=args.decode_slots,
                     kv_pool_tokens=args.kv_pool_tokens, kv_gbps=args.kv_gbps,
                     kv_bytes_per_token=_kv_bytes(raw), prefill_parallel=not args.serial_prefill,
                     tpot_slo_ms=args.tpot_slo_ms)
    out: list[GroupPlan] = []
    if args.trace:
        reqs = read_trace(args.trace)
        k = max(1, args.groups)
        span = (reqs[-1].arrival_s - reqs[0].arrival_s) if len(reqs) > 1 else 0.0
        for g in range(k):
            mine = [r for i, r in enumerate(reqs) if i % k == g]
            if not mine:
                continue
            mine = [Req(r.arrival_s, min(r.prompt_len, args.max_prompt), r.output_len,
                        r.hash_ids) for r in mine]
            hits = [0] * len(mine) if args.no_prefix else prefix_hits(mine)
            wl = Workload.from_requests(lat, [(r.prompt_len, r.output_len) for r in mine], hits)
            rate = len(mine) / span * args.rate_scale if span > 0 else 0.0
            out.append(_group_plan(f"g{g}", len(mine), rate, args.instances, wl, lat, dep,
                                   args.headroom))
    for spec in args.group or []:
        name, kv = _parse_group(spec)
        p, o, c = int(kv["prompt"]), int(kv["output"]), int(kv.get("cached", 0))
        wl = Workload.from_requests(lat, [(p, o)], [c])
        out.append(_group_plan(name, 0, kv.get("rate", 0.0),
                               int(kv.get("instances", args.instances)), wl, lat, dep,
                               args.headroom))
    return out


def _kv_bytes(raw: dict[str, Any]) -> int:
    m = raw.get("model", {})
    size = {"bfloat16": 2, "float16": 2, "float32": 4}.get(m.get("kv_dtype", "bfloat16"), 2)
    return int(m.get("num_layers", 24) * 2 * m.get("num_kv_heads", 2) * m.get("head_dim", 64)
               * size)


def _group_plan(name: str, n: int, rate: float, instances: int, wl: Workload, lat: Any,
                dep: Deployment, headroom: float) -> GroupPlan:
    prof = from_latency(lat, wl, dep)
    best = best_split(prof, instances, rate if rate > 0 else math.inf)
    needed = required(prof, rate, headroom) if rate > 0 else None
    return GroupPlan(name, n, rate, instances, wl, prof, best, needed)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="predicted best P/D ratio per group (Eq. 1)",
                       description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--profile", default="scaled-gpu", help="latency profile: name or .json")
    p.add_argument("--trace", help="Azure-style .csv or Mooncake-style .jsonl trace")
    p.add_argument("--groups", type=int, default=1, help="split the trace round robin")
    p.add_argument("--group", action="append",
                   help="NAME:prompt=P,output=O[,rate=R][,instances=N][,cached=C]")
    p.add_argument("--instances", type=int, default=12, help="instances per group")
    p.add_argument("--prefill-slots", type=int, default=1, help="b_p")
    p.add_argument("--decode-slots", type=int, default=16, help="the decode's batch cap")
    p.add_argument("--kv-pool-tokens", type=int, default=0, help="decode KV room (0: any)")
    p.add_argument("--kv-gbps", type=float, default=10.0, help="KV link, GB/s")
    p.add_argument("--serial-prefill", action="store_true",
                   help="a prefill's slots compute one after another (the worker's model "
                        "thread), not at once")
    p.add_argument("--tpot-slo-ms", type=float, default=0.0, help="cap b_d so TPOT stays "
                   "within it")
    p.add_argument("--max-prompt", type=int, default=16384, help="clip prompts (as benches do)")
    p.add_argument("--rate-scale", type=float, default=1.0, help="trace rate multiplier")
    p.add_argument("--headroom", type=float, default=1.2, help="for the instances needed")
    p.add_argument("--no-prefix", action="store_true", help="ignore prefix hits")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def run(args: argparse.Namespace) -> int:
    if not args.trace and not args.group:
        print("error: pass --trace PATH or one or more --group NAME:prompt=P,output=O",
              file=sys.stderr)
        return 2
    try:
        plans = plan(args)
    except (ValueError, OSError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"group": g.group, "requests": g.requests, "rate_rps": g.rate_rps,
                           "instances": g.instances, "workload": asdict(g.workload),
                           "profile": asdict(g.profile), "eq1_ratio": g.profile.eq1_ratio(),
                           "best": {**asdict(g.best), "label": str(g.best)},
                           "needed": asdict(g.needed) if g.needed else None}
                          for g in plans], indent=2))
        return 0
    for g in plans:
        print("\n".join(g.lines()))
    return 0
