"""Stack overhead: the cluster's TTFT and TPOT over the in-process model's.

For SmolLM2 (default) with a 512-token prompt and 64 new tokens, each round
runs in-process HF ``generate`` (timed per token with a streamer) and then the
same request through ``pdserve up`` (separate gateway, prefill, kvstore, decode
processes, timed at the gRPC client). Rounds alternate so machine noise hits
both; the report is the ratio of medians. Targets: TTFT <= 1.10x, TPOT <= 1.10x.

  python bench/overhead.py [--model smollm2] [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import UpCluster, prompt_ids, stream


def inprocess(model, ids: list[int], new_tokens: int):  # type: ignore[no-untyped-def]
    import torch
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() first pushes the prompt
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    clock = Clock()
    t0 = time.perf_counter()
    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, streamer=clock)
    gaps = [b - a for a, b in itertools.pairwise(clock.times)]
    return clock.times[0] - t0, statistics.fmean(gaps), out[0, len(ids):].tolist()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write {ttft_ratio, tpot_ratio} here")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from services.engine.prepare import ensure_prepared
    from services.model.info import ModelInfo

    ensure_prepared(args.model)
    info = ModelInfo.load(args.model)
    torch.set_num_threads(torch.get_num_threads())
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32).eval()
    ids = prompt_ids(args.prompt_tokens, info.vocab_size)
    # A fresh prompt each round: the prefill's prefix cache would make a repeated prompt's
    # cluster TTFT a cache hit (0.30x in one run), which in-process generate never gets.
    rounds = [prompt_ids(args.prompt_tokens, info.vocab_size, seed=1 + r)
              for r in range(args.rounds)]
    inproc_ttft, inproc_tpot, stack_ttft, stack_tpot = [], [], [], []
    with UpCluster(args.model) as cluster, torch.inference_mode():
        inprocess(model, ids[:32], 4)  # warm both sides once
        stream(cluster.address, ids[:32], 4)
        for r, ids in enumerate(rounds):
            t, p, ref = inprocess(model, ids, args.new_tokens)
            inproc_ttft.append(t)
            inproc_tpot.append(p)
            s = stream(cluster.address, ids, args.new_tokens)
            stack_ttft.append(s.ttft_s)
            stack_tpot.append(s.tpot_s)
            same = s.tokens == ref[: len(s.tokens)]
            print(f"round {r + 1}/{args.rounds}: in-process ttft {t * 1e3:.0f} ms tpot "
                  f"{p * 1e3:.1f} ms | cluster ttft {s.ttft_s * 1e3:.0f} ms tpot "
                  f"{s.tpot_s * 1e3:.1f} ms | tokens identical: {same}", flush=True)
    med = statistics.median
    ttft_ratio = med(stack_ttft) / med(inproc_ttft)
    tpot_ratio = med(stack_tpot) / med(inproc_tpot)
    print(f"\nmodel {info.name}, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds (medians)")
    print(f"  TTFT  in-process {med(inproc_ttft) * 1e3:7.1f} ms | cluster "
          f"{med(stack_ttft) * 1e3:7.1f} ms | ratio {ttft_ratio:.3f} (target <= 1.10)")
    print(f"  TPOT  in-process {med(inproc_tpot) * 1e3:7.1f} ms | cluster "
          f"{med(stack_tpot) * 1e3:7.1f} ms | ratio {tpot_ratio:.3f} (target <= 1.10)")
    if args.json:
        Path(args.json).write_text(json.dumps({"ttft_ratio": ttft_ratio,
                                               "tpot_ratio": tpot_ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
