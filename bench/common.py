"""Helpers the benchmarks share: a `pdserve up` cluster owned by PID, a streaming
client that times tokens, and a prompt of an exact token length."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from pdserve.v1 import generation_service_pb2, generation_service_pb2_grpc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_up(proc: subprocess.Popen[bytes]) -> int:
    """Stop a ``pdserve up`` we started: SIGTERM (it stops its children in order), then
    SIGKILL after 60 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


class UpCluster:
    """`pdserve up` in a subprocess; stopped with SIGTERM to the PID it started."""

    def __init__(self, model: str, prefill: int = 1, decode: int = 1,
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log_dir = Path(tempfile.mkdtemp(prefix="pdserve-bench-"))
        args = [sys.executable, "-m", "services.cli", "up", "--model", model, "--prefill",
                str(prefill), "--decode", str(decode), "--port", str(self.port),
                "--log-dir", str(self.log_dir), *(extra or [])]
        if "--http-port" not in args:  # a free port: 8000 may be another cluster's
            args += ["--http-port", "0"]
        self.out = open(self.log_dir / "up.out", "w+b")
        self.proc = subprocess.Popen(args, stdout=self.out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})
        self.address = f"127.0.0.1:{self.port}"

    def wait(self, timeout_s: float = 300) -> None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pdserve up exited: {self.read()}")
            if b"gateway listening" in (self.log_dir / "up.out").read_bytes():
                return
            time.sleep(0.2)
        raise TimeoutError(f"cluster not up after {timeout_s}s: {self.read()}")

    def read(self) -> str:
        return (self.log_dir / "up.out").read_text(errors="replace")

    def stop(self) -> int:
        code = stop_up(self.proc)
        self.out.close()
        return code

    def __enter__(self) -> UpCluster:
        self.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class StreamTiming:
    ttft_s: float
    tpot_s: float  # mean gap between tokens after the first
    tokens: list[int]


def stream(address: str, ids: list[int], max_tokens: int, timeout: float = 600) -> StreamTiming:
    req = generation_service_pb2.GenerateRequest(prompt_token_ids=ids, max_tokens=max_tokens)
    times: list[float] = []
    tokens: list[int] = []
    with grpc.insecure_channel(address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        t0 = time.perf_counter()
        for msg in stub.Generate(req, timeout=timeout):
            now = time.perf_counter()
            for t in msg.token_ids:
                tokens.append(t)
                times.append(now)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return StreamTiming(times[0] - t0, statistics.fmean(gaps) if gaps else 0.0, tokens)


def prompt_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    """A deterministic prompt of exactly n ids, avoiding the first 16 (specials)."""
    import random

    rng = random.Random(seed)
    return [rng.randrange(16, vocab) for _ in range(n)]
