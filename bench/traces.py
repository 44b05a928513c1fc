"""Trace loading for the scheduling bench: Azure-style CSV and Mooncake-style JSONL,
plus the P/D-Serve paper's long/short example. Prompts are built from token counts
(and, for Mooncake, shared prefixes from equal ``hash_ids``: 512-token blocks)."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

HASH_BLOCK = 512
# The two public traces ship with the project (bench/data/README.md: sources, licenses).
DATA = Path(__file__).resolve().parent / "data"
AZURE_CODE = DATA / "azure_llm_2023_code.csv"
MOONCAKE = DATA / "mooncake_synthetic_trace.jsonl"


@dataclass(frozen=True)
class TraceRequest:
    arrival_s: float
    prompt_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


def load_trace(path: str) -> list[TraceRequest]:
    p = Path(path)
    if p.suffix == ".csv":
        rows = list(csv.DictReader(p.open()))
        t0 = None
        out = []
        for r in rows:
            ts = datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp()
            t0 = ts if t0 is None else t0
            out.append(TraceRequest(ts - t0, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
        return out
    if p.suffix == ".jsonl":
        out = []
        for line in p.open():
            d = json.loads(line)
            out.append(TraceRequest(d["timestamp"] / 1000.0, int(d["input_length"]),
                                    int(d["output_length"]), tuple(d.get("hash_ids", ()))))
        return out
    raise ValueError(f"{path}: expected an Azure-style .csv or a Mooncake-style .jsonl trace")


def paper_example(bursts: int = 20, gap_s: float = 1.0) -> list[TraceRequest]:
    """Bursts of one 8k prompt and three 2k prompts at the same instant (P/D-Serve §1.5)."""
    out = []
    for b in range(bursts):
        out.append(TraceRequest(b * gap_s, 8192, 16))
        out.extend(TraceRequest(b * gap_s + 0.001, 2048, 16) for _ in range(3))
    return out


def prompt_ids(req: TraceRequest, index: int, vocab: int, salt: int = 0) -> list[int]:
    """Token ids of exactly ``prompt_len``; equal hash ids give equal 512-token blocks.

    ``salt`` makes every replay of a trace distinct: the workers keep a prefix cache, so
    replaying the same prompts for the next policy or load would hit it and make
    whichever ran later look faster. Sharing *within* a replay (equal hash ids) stays."""
    if req.hash_ids:
        ids: list[int] = []
        for h in req.hash_ids:
            rng = random.Random(f"{salt}/{h}")
            ids.extend(rng.randrange(16, vocab) for _ in range(HASH_BLOCK))
        ids = ids[: req.prompt_len]
        rng = random.Random(f"{salt}/tail/{index}")
        ids.extend(rng.randrange(16, vocab) for _ in range(req.prompt_len - len(ids)))
        return ids
    rng = random.Random(f"{salt}/{index}")
    return [rng.randrange(16, vocab) for _ in range(req.prompt_len)]
