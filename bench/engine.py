"""Engine throughput: continuous batching, prefill batching and the prefix cache.

Every figure is a ratio measured in this one run (the machine is 2 shared cores).

1. Decode tokens/s at 1, 4, 8 and 16 concurrent streams (SmolLM2 by default, prompts
   of 201-301 tokens, 64 new tokens): our batched paged decode (``decode_batch``: one
   forward per step over the paged pool) against our own single stream, and against
   a left-padded HF batch of the same prompts in the same process, stepped as
   ``generate`` steps (decode only, no prefill). Each round visits every batch size.
2. Prefill batching: four prompts of different lengths one after another against one
   padded batch of four (the measurement behind prefill's no-batching default).
3. The prefix cache on the Mooncake trace (``hash_ids`` are 512-token blocks): the
   real ``PrefixCache`` per prefill, requests spread over prefills in scenario groups
   (scenario = the prompt's first block) or over all prefills. Prefill times come from
   the mock latency model (``--profile``, default scaled-gpu), so the TTFTs are
   modelled (FIFO queue per prefill), the hit rates are the cache's own.
4. The whole cluster (``pdserve up``) against ``transformers serve --continuous-batching
   --cb-num-blocks 64 --cb-max-batch-tokens 2048`` on the same saved model dir: a
   251-token chat prompt, 64 new tokens, 8 concurrent streams (``bench/engine_peer.py``;
   the peer's serving packages go to a private ``pip --target`` folder).

  python bench/engine.py [--model smollm2] [--quick] [--skip-serve] [--json FILE]
                         [--attention kernel|sdpa]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# As ``pdserve up`` runs its model workers: OpenMP threads sleep instead of spinning at
# barriers. Read when torch loads (below), so it must be set first. On a loaded host the
# default spin-wait made single decode steps 25-60x slower here (PASSIVE 63-87 ms, default
# 2.4-4.9 s per SmolLM2 step at load ~16), which measured the neighbours, not the engine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from bench.common import prompt_ids
from bench.traces import MOONCAKE

TRACE = MOONCAKE


def _lengths(n: int, center: int, spread: int = 50) -> list[int]:
    return [center - spread + (i * 37) % (2 * spread + 1) for i in range(n)]


def decode_scaling(spec: str, streams: list[int], new_tokens: int, center: int,
                   threads: int, rounds: int, bar: Any) -> dict[int, dict[str, Any]]:
    """Per-step decode time at each batch size, ours and a padded HF batch; medians.

    Every round visits every batch size in turn (ours, then the padded batch right after
    it), so a slow spell of the shared host hits all of them, not the one batch size that
    happened to run then (the single stream ran first and alone, and its speed moved
    30-45 ms a step between runs while the 16-stream step held). Each batch size has its
    own pool of the same size, and all are set up before the first round."""
    import torch
    from transformers import AutoModelForCausalLM

    from services.engine.pool import KvPool, decode_batch
    from services.engine.runner import ModelRunner
    from services.engine.sampling import Sampling

    runner = ModelRunner(spec, threads=threads)
    pool_tokens = max(streams) * (center + 60 + new_tokens + 16)
    runner.attach_pool(pool_tokens, 16)  # our attention, and the kernel compiled
    hf = AutoModelForCausalLM.from_pretrained(runner.path, dtype=torch.float32).eval()
    pad = runner.info.eos_token_ids[0] if runner.info.eos_token_ids else 0
    per_round = max(1, (new_tokens - 1) // rounds)
    cases = {b: _DecodeCase(runner, hf, pad, b, center, new_tokens,
                            KvPool(runner.config, -(-pool_tokens // 16), 16))
             for b in streams}
    greedy = Sampling()
    for _ in range(rounds):
        for b, c in cases.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                c.toks = decode_batch(runner.model, c.pool, c.toks, c.seqs, [greedy] * b)
                for got, t in zip(c.produced, c.toks, strict=True):
                    got.append(t)
            c.ours_t.append((time.perf_counter() - t0) / per_round)
            t0 = time.perf_counter()
            for _ in range(per_round):
                c.hf_step()
            c.hf_t.append((time.perf_counter() - t0) / per_round)
            bar.update(1)
    out: dict[int, dict[str, Any]] = {}
    for b, c in cases.items():
        for seq in c.seqs:
            c.pool.free(seq.table)
        # Token identity: the single stream, and the first sequences of the largest batch,
        # against batch-1 greedy ``generate`` (stock attention and linear layers).
        same = None
        if b in (1, max(streams)):
            with torch.inference_mode():
                same = all(
                    hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p),
                                dtype=torch.long), max_new_tokens=len(c.produced[i]),
                                do_sample=False)[0, len(p):].tolist() == c.produced[i]
                    for i, p in enumerate(c.prompts[:3]))
        out[b] = {"identical_to_generate": same,
                  "ours_tok_s": b / statistics.median(c.ours_t),
                  "padded_hf_tok_s": b / statistics.median(c.hf_t),
                  "ours_step_ms": 1e3 * statistics.median(c.ours_t),
                  "padded_hf_step_ms": 1e3 * statistics.median(c.hf_t),
                  # Each of our rounds against the padded round right after it: the load
                  # on a shared host moves within seconds, and a spike in one round of
                  # two moved a median of separate rounds by 2x.
                  "ours_over_padded_paired": statistics.median(
                      h / o for o, h in zip(c.ours_t, c.hf_t, strict=True)),
                  "ours_step_s_rounds": c.ours_t}
    return out


class _DecodeCase:
    """One batch size of ``decode_scaling``: ``b`` prompts prefilled and scattered into
    their own pool (not timed: decode only), and the same prompts as a left-padded HF
    batch over a DynamicCache with mask and per-row positions: what generate() runs per
    step, without generate's own per-step overhead (a stricter baseline than generate)."""

    def __init__(self, runner: Any, hf: Any, pad: int, b: int, center: int,
                 new_tokens: int, pool: Any) -> None:
        import torch
        from transformers import DynamicCache

        from services.engine.pool import PagedSeq
        from services.engine.sampling import Sampling

        self.hf, self.pool = hf, pool
        self.prompts = [prompt_ids(n, runner.info.vocab_size, seed=i)
                        for i, n in enumerate(_lengths(b, center))]
        self.seqs: list[PagedSeq] = []
        self.toks: list[int] = []
        for p in self.prompts:
            first, cache = runner.prefill(p, Sampling())
            _, buf = runner.pack(cache, False)
            table = pool.allocate("b", len(p) + new_tokens + 1)
            meta = pool.scatter(memoryview(buf), table, runner.fingerprint)
            self.seqs.append(PagedSeq(table, meta.num_tokens))
            self.toks.append(first)
        self.produced = [[t] for t in self.toks]
        self.ours_t: list[float] = []
        self.hf_t: list[float] = []
        width = max(map(len, self.prompts))
        self.mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in self.prompts])
        with torch.inference_mode():
            self.hf_cache = DynamicCache(config=hf.config)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in self.prompts])
            pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
            o = hf(input_ids=ids, attention_mask=self.mask, position_ids=pos,
                   past_key_values=self.hf_cache, use_cache=True, logits_to_keep=1)
            self.hf_tok = o.logits[:, -1].argmax(-1, keepdim=True)
            self.hf_pos = torch.tensor([[len(p)] for p in self.prompts])

    def hf_step(self) -> None:
        import torch

        with torch.inference_mode():
            b = self.mask.shape[0]
            self.mask = torch.cat([self.mask, torch.ones((b, 1), dtype=self.mask.dtype)], 1)
            o = self.hf(input_ids=self.hf_tok, attention_mask=self.mask,
                        position_ids=self.hf_pos, past_key_values=self.hf_cache,
                        use_cache=True, logits_to_keep=1)
            self.hf_tok = o.logits[:, -1].argmax(-1, keepdim=True)
            self.hf_pos = self.hf_pos + 1


def prefill_batching(spec: str, lengths: list[int], rounds: int) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from services.engine.prepare import ensure_prepared
    from services.model.info import ModelInfo

    ensure_prepared(spec)
    info = ModelInfo.load(spec)
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32).eval()
    prompts = [prompt_ids(n, info.vocab_size, seed=n) for n in lengths]
    width = max(lengths)
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts])  # right pad
    mask = torch.tensor([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    seq_t, bat_t = [], []
    with torch.inference_mode():
        for _ in range(rounds):
            t0 = time.perf_counter()
            for p in prompts:
                model(input_ids=torch.tensor([p]), past_key_values=DynamicCache(
                    config=model.config), use_cache=True, logits_to_keep=1)
            seq_t.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            model(input_ids=ids, attention_mask=mask, past_key_values=DynamicCache(
                config=model.config), use_cache=True, logits_to_keep=1)
            bat_t.append(time.perf_counter() - t0)
    s, b = statistics.median(seq_t), statistics.median(bat_t)
    return {"sequential_s": s, "batched_s": b, "batched_over_sequential": b / s}


def prefill_packed(spec: str, lengths: list[int], rounds: int) -> dict[str, Any]:
    """Packed (varlen) prefill: the prompts concatenated into ONE sequence with no padding,
    positions restarting per prompt (transformers then builds a block-diagonal causal
    mask), logits kept at each prompt's last token. Against the prompts one after another:
    the time, whether the first tokens are the same, and the mean TTFT of a burst of these
    prompts arriving together (sequential: the i-th waits for the i-1 before it; packed:
    every one waits for the whole forward)."""
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    from services.engine.prepare import ensure_prepared
    from services.model.info import ModelInfo

    ensure_prepared(spec)
    info = ModelInfo.load(spec)
    model = AutoModelForCausalLM.from_pretrained(info.path, dtype=torch.float32).eval()
    prompts = [prompt_ids(n, info.vocab_size, seed=n) for n in lengths]
    ids = torch.tensor([[t for p in prompts for t in p]])
    pos = torch.tensor([[i for p in prompts for i in range(len(p))]])
    ends = torch.tensor(list(itertools.accumulate(lengths))) - 1
    seq_t: list[list[float]] = []
    pack_t: list[float] = []
    with torch.inference_mode():
        for _ in range(rounds):
            t0, marks, firsts = time.perf_counter(), [], []
            for p in prompts:
                o = model(input_ids=torch.tensor([p]), past_key_values=DynamicCache(
                    config=model.config), use_cache=True, logits_to_keep=1)
                firsts.append(int(o.logits[0, -1].argmax()))
                marks.append(time.perf_counter() - t0)
            seq_t.append(marks)
            t0 = time.perf_counter()
            # No cache object: transformers builds the block-diagonal mask from restarting
            # positions only without one (with a cache it would mask causally across
            # prompts). Timing the forward alone; serving would take the K/V per layer.
            o = model(input_ids=ids, position_ids=pos, use_cache=False, logits_to_keep=ends)
            pack_t.append(time.perf_counter() - t0)
            packed_firsts = o.logits[0].argmax(-1).tolist()
    total = statistics.median(m[-1] for m in seq_t)
    mean_seq = statistics.median(statistics.fmean(m) for m in seq_t)
    packed = statistics.median(pack_t)
    return {"sequential_s": total, "packed_s": packed, "packed_over_sequential": packed / total,
            "burst_mean_ttft_sequential_s": mean_seq, "burst_mean_ttft_packed_s": packed,
            "same_first_tokens": packed_firsts == firsts}


def prefix_replay(trace: Path, prefills: int, groups: int, cache_blocks: int,
                  profile: str, limit: int) -> dict[str, dict[str, float]]:
    from services.engine.mock import LatencyModel
    from services.engine.prefix import PrefixCache
    from services.model.profile import profile_path

    if trace.suffix != ".jsonl":
        raise SystemExit(f"{trace}: the prefix replay needs shared-prefix hash_ids "
                         "(a Mooncake-style .jsonl trace)")

    rows = [json.loads(line) for line in trace.read_text().splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    lat = LatencyModel.from_profile(json.loads(profile_path(profile).read_text()))
    block = 512  # the trace's hash_ids name 512-token blocks
    out = {}
    for name, grouped in (("grouped", True), ("ungrouped", False)):
        caches = [PrefixCache(cache_blocks, block) for _ in range(prefills)]
        free_at = [0.0] * prefills
        ttft, tokens, saved = [], 0, 0
        per_group = prefills // groups
        for r in rows:
            members = range(prefills)
            if grouped:  # scenario = the prompt's first block: its group's prefills only
                g = r["hash_ids"][0] % groups
                members = range(g * per_group, (g + 1) * per_group)
            t = r["timestamp"]
            i = min(members, key=lambda k: (max(free_at[k], t), k))
            keys = [h.to_bytes(8, "little") for h in r["hash_ids"]]
            n = r["input_length"]
            hit = caches[i].match(keys, (n - 1) // block)
            caches[i].insert(keys, [(None, 1)] * (len(keys) - len(hit)))
            cached = len(hit) * block
            start = max(free_at[i], t)
            free_at[i] = start + lat.prefill_ms(n, cached)
            ttft.append(free_at[i] - t)
            tokens += n
            saved += cached
        hits = sum(c.stats.hits for c in caches)
        ttft.sort()
        out[name] = {"token_hit_rate": saved / tokens, "request_hit_rate": hits / len(rows),
                     "ttft_p50_ms": ttft[len(ttft) // 2],
                     "ttft_p99_ms": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))]}
    return out


def plot(scaling: dict[int, dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = sorted(scaling)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, [scaling[x]["ours_tok_s"] for x in xs], "o-", label="pdserve batched paged decode")
    ax.plot(xs, [scaling[x]["padded_hf_tok_s"] for x in xs], "s--",
            label="HF generate, padded batch")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("decode tokens/s")
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Decode throughput (one run, 2 shared CPU cores)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and trace rows")
    ap.add_argument("--json", type=Path, help="write the ratios here")
    ap.add_argument("--plot", type=Path,
                    default=Path(__file__).resolve().parent / "out" / "engine_decode.png")
    ap.add_argument("--prompt-tokens", type=int, default=251)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both engines (0: one per core)")
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--prefills", type=int, default=8)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--prefix-cache-blocks", type=int, default=1024,
                    help="per prefill, in the trace's 512-token blocks")
    ap.add_argument("--profile", default="scaled-gpu", help="mock latency profile for TTFT")
    ap.add_argument("--skip-serve", action="store_true",
                    help="skip the comparison with transformers serve")
    ap.add_argument("--peer-site", type=Path,
                    default=Path.home() / ".cache/pdserve/peer-site",
                    help="where the peer's serving packages are installed (pip --target)")
    ap.add_argument("--parts", default="prefix,prefill,decode,serve",
                    help="comma list of the parts to run")
    ap.add_argument("--attention", choices=("kernel", "sdpa"), default="kernel",
                    help="decode attention: the compiled kernel (engine.attend), or the SDPA "
                         "fallback (lanes), for an A/B of the two")
    args = ap.parse_args()
    if args.attention == "sdpa":
        from services.engine import attend

        attend.disable()
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {}

    def save() -> None:  # after every part, so a later failure keeps what was measured
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))

    if "prefix" in parts:
        result.update(_run_prefix(args))
        save()
    if "prefill" in parts:
        result.update(_run_prefill(args))
        save()
    if "decode" in parts:
        result.update(_run_decode(args))
        save()
    if "serve" in parts and not args.skip_serve:
        result.update(_run_serve(args))
        save()


def _run_prefix(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    with tqdm(total=1, desc="prefix replay", unit="trace") as bar:
        prefix = prefix_replay(args.trace, args.prefills, args.groups,
                               args.prefix_cache_blocks, args.profile, 0)
        bar.update(1)
    print(f"Prefix cache on the Mooncake trace ({args.prefills} prefills, {args.groups} groups, "
          f"{args.prefix_cache_blocks} blocks each, TTFT modelled with {args.profile}):")
    for name, p in prefix.items():
        print(f"  {name:9s} token hit rate {p['token_hit_rate']:.3f}, requests with a hit "
              f"{p['request_hit_rate']:.3f}, TTFT p50 {p['ttft_p50_ms']:.0f} ms, "
              f"p99 {p['ttft_p99_ms']:.0f} ms")
    return {"prefix_hit_rate_grouped": prefix["grouped"]["token_hit_rate"],
            "prefix_hit_rate_ungrouped": prefix["ungrouped"]["token_hit_rate"],
            "prefix_replay": prefix}


def _run_prefill(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    with tqdm(total=3, desc="prefill batching", unit="case") as bar:
        pb = prefill_batching(args.model, [128, 192, 256, 320], 2 if args.quick else 3)
        bar.update(1)
        pb_eq = prefill_batching(args.model, [224] * 4, 2 if args.quick else 3)
        bar.update(1)
        pk = prefill_packed(args.model, [128, 192, 256, 320], 2 if args.quick else 3)
        bar.update(1)
    print(f"Prefill of 4 prompts (128-320 tokens): one after another {pb['sequential_s']:.2f} s,"
          f" one padded batch {pb['batched_s']:.2f} s (batched/sequential "
          f"{pb['batched_over_sequential']:.2f}); four of 224 tokens: batched/sequential "
          f"{pb_eq['batched_over_sequential']:.2f}")
    print(f"Packed (varlen, no padding) prefill of the same 4: {pk['packed_s']:.2f} s against "
          f"{pk['sequential_s']:.2f} s one after another ({pk['packed_over_sequential']:.2f}); "
          f"mean TTFT of the 4 arriving together {pk['burst_mean_ttft_packed_s']:.2f} s packed, "
          f"{pk['burst_mean_ttft_sequential_s']:.2f} s sequential; same first tokens: "
          f"{pk['same_first_tokens']}")
    return {"prefill_packed": pk,
            "prefill_packed_over_sequential": pk["packed_over_sequential"],
            "prefill_batched_over_sequential": pb["batched_over_sequential"],
            "prefill_batched_over_sequential_equal_lengths": pb_eq["batched_over_sequential"]}


def _run_decode(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    streams = [1, 4, 8, 16]
    new_tokens = 32 if args.quick else 64
    rounds = 4 if args.quick else 6
    with tqdm(total=rounds * len(streams), desc="decode scaling", unit="round") as bar:
        scaling = decode_scaling(args.model, streams, new_tokens, args.prompt_tokens,
                                 args.threads, rounds, bar)
    one = scaling[1]["ours_tok_s"]
    print(f"Decode ({args.model}, prompts {args.prompt_tokens}±50 tokens, "
          f"{new_tokens} new tokens, median of {rounds} alternating rounds):")
    print("  streams  ours tok/s  vs 1 strm  padded HF tok/s  ours/padded  paired rounds")
    for b in streams:
        s = scaling[b]
        print(f"  {b:7d}  {s['ours_tok_s']:10.1f}  {s['ours_tok_s'] / one:9.2f}  "
              f"{s['padded_hf_tok_s']:15.1f}  {s['ours_tok_s'] / s['padded_hf_tok_s']:11.2f}"
              f"  {s['ours_over_padded_paired']:13.2f}")
    same = scaling[16]["identical_to_generate"]
    paired = statistics.median(16 * o1 / o16 for o1, o16 in zip(
        scaling[1]["ours_step_s_rounds"], scaling[16]["ours_step_s_rounds"], strict=True))
    print(f"  16 streams vs 1, median of the rounds' own ratios: {paired:.2f}")
    print(f"  greedy tokens of 3 of the 16 streams identical to batch-1 generate: {same}; "
          f"of the single stream: {scaling[1]['identical_to_generate']}")
    plot(scaling, args.plot)
    print(f"plot: {args.plot}")
    return {"decode_attention": args.attention,
            "decode16_identical_to_generate": same,
            "decode1_identical_to_generate": scaling[1]["identical_to_generate"],
            "decode16_vs_decode1": scaling[16]["ours_tok_s"] / one,
            # Median over rounds of that round's 16-stream against its 1-stream tokens/s
            # (the two ran seconds apart in every round).
            "decode16_vs_decode1_paired": statistics.median(
                16 * o1 / o16 for o1, o16 in zip(scaling[1]["ours_step_s_rounds"],
                                                 scaling[16]["ours_step_s_rounds"],
                                                 strict=True)),
            # Median over rounds of (padded round time / our round before it).
            "decode16_vs_padded_hf16": scaling[16]["ours_over_padded_paired"],
            "decode16_vs_padded_hf16_separate":
                scaling[16]["ours_tok_s"] / scaling[16]["padded_hf_tok_s"],
            "decode_tok_s": {str(b): scaling[b] for b in streams}}


def _run_serve(args: argparse.Namespace) -> dict[str, Any]:
    from tqdm import tqdm

    from bench.engine_peer import compare

    with tqdm(total=2, desc="vs transformers serve", unit="system") as bar:
        serve = compare(args.model, args.peer_site, args.prompt_tokens, 64, 8,
                        8 if args.quick else 16, bar)
    print(f"Cluster vs transformers serve --continuous-batching ({serve['prompt_tokens']}-"
          f"token chat prompt, 64 new tokens, 8 concurrent):")
    for name in ("ours", "theirs"):
        r = serve[name]
        print(f"  {name:6s} {r['tok_s']:6.1f} tok/s, TTFT p50 {r['ttft_p50_s']:.2f} s, "
              f"p99 {r['ttft_p99_s']:.2f} s ({r['tokens']:.0f} tokens in {r['wall_s']:.1f} s)")
    print("  ratios (ours/theirs): " + ", ".join(
        f"{k} {v:.2f}" for k, v in serve["ratios"].items()))
    return {"vs_transformers_serve": serve["ratios"], "serve": serve}


if __name__ == "__main__":
    main()
