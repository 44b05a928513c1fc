"""bench/frontdoor.py's peer: NVIDIA Dynamo 1.6.1 disaggregated (Rust frontend with the KV
router, one prefill mocker, one decode mocker) on the same box, started and stopped by PID.

Install it into its own venv and pass that venv's python with ``--dynamo-python``.
``pip install ai-dynamo==1.6.1`` fails here (its ``aisimulate`` dependency downloads from
NVIDIA's own index, and the ``certifi`` it pins is not published); this works::

    python -m venv /tmp/dynvenv && . /tmp/dynvenv/bin/activate
    pip install torch==2.13.0
    pip install ai-dynamo-runtime==1.6.1 "aiohttp<4,>=3.14.3" certifi \
        "kubernetes<33,>=32.0.1" msgspec "prometheus-client<1,>=0.23.1" "pyzmq>=26" \
        "redis<9,>=6.2" tqdm "transformers>=4.56" "zstandard<1,>=0.23" httpx
    pip download --no-deps ai-dynamo==1.6.1 -d dynwhl
    pip install --no-deps dynwhl/ai_dynamo-1.6.1-py3-none-any.whl

(pip warns that aisimulate is missing; the mocker and the frontend do not need it.)
No etcd or NATS: file discovery, TCP request plane, ZMQ events, all on loopback. The mockers
run at ``--speedup-ratio 100`` (engine time about 0; "0" behaved like 1 here). Dynamo has
only an HTTP door, so its client streams SSE from ``/v1/completions`` over its own
keep-alive HTTP/1.1 connections with TCP_QUICKACK (``drive_http`` says why: an ordinary
client halved Dynamo's req/s through delayed ACKs); pdserve's client is grpc.aio. Both
clients run in the bench process.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import free_port
from services.model.info import KNOWN, cache_root

MODEL_DIR = cache_root() / "models" / KNOWN["smollm2"]  # PDSERVE_CACHE_DIR honoured
MODEL = "smollm2"


class Dynamo:
    def __init__(self, python: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pdserve-dynamo-"))
        self.port = free_port()
        env = {**os.environ, "DYN_FILE_KV": str(self.dir / "kv"), "HF_HUB_OFFLINE": "1",
               "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
               "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1"}
        env.pop("PYTHONPATH", None)
        common = ["--discovery-backend", "file", "--request-plane", "tcp",
                  "--event-plane", "zmq"]
        mocker = [python, "-m", "dynamo.mocker", "--model-path", str(MODEL_DIR),
                  "--model-name", MODEL, *common, "--speedup-ratio", "100"]
        cmds = {
            "frontend": [python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
                         "--http-port", str(self.port), *common, "--router-mode", "kv",
                         "--enforce-disagg"],
            "prefill": [*mocker, "--disaggregation-mode", "prefill"],
            "decode": [*mocker, "--disaggregation-mode", "decode"],
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, cmd in cmds.items():
            with open(self.dir / f"{name}.log", "wb") as log:
                self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log,
                                                    stderr=subprocess.STDOUT,
                                                    stdin=subprocess.DEVNULL,
                                                    start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait(self, timeout_s: float = 300) -> None:
        """Until a completion streams back (model registered, both workers routed)."""
        import httpx

        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"dynamo {name} exited: "
                                       f"{(self.dir / f'{name}.log').read_text()[-2000:]}")
            try:
                r = httpx.post(f"{self.url}/v1/completions", timeout=10, json={
                    "model": MODEL, "prompt": "hello", "max_tokens": 2})
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TimeoutError(f"dynamo not serving after {timeout_s}s; logs in {self.dir}")

    def pids(self) -> dict[str, int]:
        return {f"dynamo-{n}": p.pid for n, p in self.procs.items()}

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)  # the group this object started
        for p in self.procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


async def drive_http(url: str, c: int, n: int, prompts: list[str],
                     new_tokens: int) -> tuple[float, list[float], int]:
    """n streamed completions by c concurrent clients; wall time, TTFTs (ms), errors.

    Each client is one keep-alive HTTP/1.1 connection (asyncio, TCP_NODELAY) that reads
    the chunked SSE stream itself and re-arms TCP_QUICKACK after every read. Dynamo's
    frontend writes its response in several small segments without TCP_NODELAY, so with
    an ordinary client (httpx, aiohttp, a plain socket) Nagle holds a segment until the
    client's delayed ACK, 40 ms: 3-28% of c = 1 requests took 45-55 ms, and its c = 1
    req/s fell from ~250 to 50-130 (measured on this box). Acknowledging at once removes
    that artefact, so the figure is Dynamo's own cost, as in the reference measurement.
    """
    import socket
    from urllib.parse import urlsplit

    u = urlsplit(url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    ttfts: list[float] = []
    errors = 0
    next_i = iter(range(n))

    async def user() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        sock = writer.get_extra_info("socket")

        def ack_now() -> None:  # Linux clears QUICKACK after use: re-arm it per read
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)

        try:
            for i in next_i:
                body = json.dumps({
                    "model": MODEL, "prompt": prompts[i % len(prompts)],
                    "max_tokens": new_tokens, "min_tokens": new_tokens, "stream": True,
                    "ignore_eos": True, "stream_options": {"include_usage": True}}).encode()
                t0 = time.perf_counter()
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\n"
                             b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                             % (host.encode(), len(body)) + body)
                ack_now()
                head = await reader.readuntil(b"\r\n\r\n")
                ack_now()
                if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
                    errors += 1
                    return  # the connection's framing is unknown now: stop this client
                first = None
                got = 0
                buf = b""
                while True:
                    size = int((await reader.readline()).split(b";")[0].strip(), 16)
                    chunk = await reader.readexactly(size + 2)  # data + CRLF
                    ack_now()
                    if size == 0:
                        break
                    buf += chunk[:-2]
                    *events, buf = buf.split(b"\n\n")
                    for ev in events:
                        line = ev.strip()
                        if not line.startswith(b"data:") or line == b"data: [DONE]":
                            continue
                        d = json.loads(line[5:])
                        if d.get("choices") and d["choices"][0].get("text") and first is None:
                            first = time.perf_counter() - t0
                        if d.get("usage"):
                            got = int(d["usage"]["completion_tokens"])
                if first is None or got != new_tokens:
                    errors += 1
                    continue
                ttfts.append(first * 1e3)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(user() for _ in range(c)))
    return time.perf_counter() - t0, ttfts, errors


def text_prompts(n_tokens: int, count: int = 256) -> list[str]:
    """Distinct prompts of about ``n_tokens`` SmolLM2 tokens (no prefix sharing)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_DIR / "tokenizer.json"))
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel",
             "india", "juliet", "kilo", "lima", "mike", "november", "oscar", "papa"]
    out = []
    for i in range(count):
        ws = [f"{i}"] + [words[(i * 7 + j * 3) % len(words)] for j in range(n_tokens)]
        text = " ".join(ws)
        while len(tok.encode(text).ids) > n_tokens and " " in text:
            text = text.rsplit(" ", 1)[0]
        out.append(text)
    return out
