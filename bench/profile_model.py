"""Measure a model's prefill and decode latency here and fit the mock engine's profile.

  python bench/profile_model.py --model smollm2 --out services/model/profiles/smollm2-cpu.json

Fits prefill_ms(n) = a + b*n + c*n^2 over prompt lengths, and
decode_ms(batch=1, ctx) = d0 + d2*ctx over context lengths (one stream; the batch
term d1 stays 0 until the decode batches). Medians of repeated runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from services.engine.runner import ModelRunner
    from services.engine.sampling import Sampling

    r = ModelRunner(args.model)
    info = r.info
    lengths = [n for n in (32, 128, 256, 512, 1024, 1536) if n < info.max_context - 64]
    pre = []
    for n in lengths:
        ids = [(i * 7) % (info.vocab_size - 16) + 16 for i in range(n)]
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            r.prefill(ids, Sampling())
            times.append((time.perf_counter() - t) * 1e3)
        pre.append(statistics.median(times))
        print(f"prefill {n:5d} tokens: {pre[-1]:8.1f} ms", flush=True)
    a_, b_, c_ = np.polyfit(np.array(lengths, float), np.array(pre), 2)[::-1]
    ctxs = [n for n in (64, 512, 1024) if n < info.max_context - 64]
    dec = []
    for n in ctxs:
        ids = [(i * 7) % (info.vocab_size - 16) + 16 for i in range(n)]
        first, cache = r.prefill(ids, Sampling())
        tok, t = first, time.perf_counter()
        for _ in range(16):
            tok = r.decode_step(tok, cache, Sampling())
        dec.append((time.perf_counter() - t) * 1e3 / 16)
        print(f"decode at ctx {n:5d}: {dec[-1]:8.1f} ms/step", flush=True)
    d2, d0 = np.polyfit(np.array(ctxs, float), np.array(dec), 1)
    profile = {
        "name": f"{info.name}-cpu-measured",
        "model": {"num_layers": info.num_layers, "num_kv_heads": info.num_kv_heads,
                  "head_dim": info.head_dim, "kv_dtype": info.kv_dtype,
                  "vocab_size": info.vocab_size, "max_context": info.max_context},
        "prefill_ms": {"a": max(a_, 0.0), "b": max(b_, 0.0), "c": max(c_, 0.0)},
        "decode_ms": {"d0": max(d0, 0.0), "d1": 0.0, "d2": max(d2, 0.0)},
        "prefix_speedup": 1.0,
        "measured": {"prefill": dict(zip(map(str, lengths), pre, strict=True)),
                     "decode": dict(zip(map(str, ctxs), dec, strict=True))},
    }
    Path(args.out).write_text(json.dumps(profile, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
