"""bench/engine.py, part 4: the whole cluster against ``transformers serve
--continuous-batching`` on the same saved model dir, same chat prompt, same load.

The peer needs ``transformers[serving]`` (fastapi, uvicorn, openai, ...), which pdserve
itself does not. So that pdserve's own environment stays as it is, those packages are
installed once with ``pip install --target`` into a private folder (default
``~/.cache/pdserve/peer-site``) that only the peer process sees on its PYTHONPATH; the
bench says when it does this. The peer is started and stopped by its PID.

Load: ``concurrency`` clients each send ``requests / concurrency`` streamed requests
back to back (greedy, ``max_tokens`` new tokens). TTFT is the first content chunk (ours:
the first token message); tokens/s is all streamed tokens over the wall time.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import UpCluster, free_port, stream

PEER_PACKAGES = ["openai>=1.98.0", "fastapi", "uvicorn", "starlette", "rich"]


def ensure_peer_site(site: Path) -> None:
    if (site / "fastapi").exists() and (site / "uvicorn").exists() and (site / "openai").exists():
        return
    print(f"installing the peer's serving packages into {site} (pip --target, once)")
    site.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site),
                    *PEER_PACKAGES], check=True)


class TransformersServe:
    """``transformers serve`` with continuous batching, owned by PID."""

    def __init__(self, model_dir: Path, site: Path) -> None:
        self.port = free_port()
        self.log = tempfile.NamedTemporaryFile(prefix="tserve-", suffix=".log", delete=False)
        exe = Path(sys.executable).with_name("transformers")
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
        self.proc = subprocess.Popen(
            [str(exe), "serve", str(model_dir), "--device", "cpu", "--host", "127.0.0.1",
             "--port", str(self.port), "--continuous-batching", "--cb-num-blocks", "64",
             "--cb-max-batch-tokens", "2048"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def __enter__(self) -> TransformersServe:
        end = time.monotonic() + 300
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"transformers serve exited: {self.text()[-2000:]}")
            if "Uvicorn running" in self.text():
                return self
            time.sleep(0.3)
        raise TimeoutError("transformers serve did not start in 300 s")

    def text(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def http_stream(port: int, model: str, text: str, max_tokens: int) -> tuple[float, int]:
    """(TTFT s, tokens) of one streamed chat completion."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": text}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"peer answered HTTP {resp.status}: {resp.read()[:500]!r}")
    ttft, chunks, usage = 0.0, 0, 0
    for raw in resp:
        line = raw.strip()
        if not line.startswith(b"data:") or line == b"data: [DONE]":
            continue
        msg = json.loads(line[5:])
        if msg.get("usage"):
            usage = int(msg["usage"].get("completion_tokens", 0))
        if msg.get("choices") and msg["choices"][0].get("delta", {}).get("content"):
            chunks += 1
            if not ttft:
                ttft = time.perf_counter() - t0
    conn.close()
    return ttft, usage or chunks


def load(one: Callable[[], tuple[float, int]], requests: int, concurrency: int
         ) -> dict[str, float]:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: one(), range(requests)))
    wall = time.perf_counter() - t0
    ttfts = sorted(r[0] for r in results)
    return {"tok_s": sum(r[1] for r in results) / wall, "ttft_p50_s": statistics.median(ttfts),
            "ttft_p99_s": ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
            "tokens": float(sum(r[1] for r in results)), "wall_s": wall}


def chat_text(tok: Any, tokens: int) -> str:
    """A user message whose chat-templated prompt is ``tokens`` long (or just under)."""
    words = ("Please summarise the following notes about distributed serving, caches, "
             "schedulers and the cost of moving bytes between machines. ").split()
    text = ""
    i = 0
    while len(tok.encode_chat(text + " " + words[i % len(words)])) <= tokens:
        text = (text + " " + words[i % len(words)]).strip()
        i += 1
    return text


def compare(model: str, site: Path, tokens: int, new_tokens: int, concurrency: int,
            requests: int, bar: Any) -> dict[str, Any]:
    from services.engine.prepare import ensure_prepared
    from services.model.info import ModelInfo
    from services.model.tokenizer import TextTokenizer

    ensure_prepared(model)
    info = ModelInfo.load(model)
    tok = TextTokenizer(info.path)
    text = chat_text(tok, tokens)
    ids = tok.encode_chat(text)
    ensure_peer_site(site)
    out: dict[str, Any] = {"prompt_tokens": len(ids)}
    with TransformersServe(info.path, site) as peer:
        http_stream(peer.port, str(info.path), text, 8)  # warm-up
        out["theirs"] = load(lambda: http_stream(peer.port, str(info.path), text, new_tokens),
                             requests, concurrency)
    bar.update(1)
    # Worker defaults: decode batches 16, prefill admits 4 (the rest wait in the gateway's
    # forwarding queue, as P/D-Serve does).
    with UpCluster(model) as cluster:
        stream(cluster.address, ids, 8)  # warm-up

        def ours() -> tuple[float, int]:
            t = stream(cluster.address, ids, new_tokens)
            return t.ttft_s, len(t.tokens)

        out["ours"] = load(ours, requests, concurrency)
    bar.update(1)
    o, t = out["ours"], out["theirs"]
    out["ratios"] = {"tok_s_ratio": o["tok_s"] / t["tok_s"],
                     "ttft_p50_ratio": o["ttft_p50_s"] / t["ttft_p50_s"],
                     "ttft_p99_ratio": o["ttft_p99_s"] / t["ttft_p99_s"]}
    return out
