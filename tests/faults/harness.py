"""The fault matrix's cluster: every service a separate OS process (``python -m
services.<role>``), started, killed, stopped and restarted by PID from here, so a case
never depends on ``pdserve up``'s supervision. Shared by tests/faults and bench/chaos.py.

A case sends load through the public API, injects its fault, and measures what the issue
asks for: how each request ended (tokens, a clear status, or hung past deadline + 5 s), the
KV still held right after the load (kvstore bytes plus decode pool blocks), and how long
until a fresh request is served again (the recovery time).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from pdserve.v1 import (
    decode_service_pb2,
    decode_service_pb2_grpc,
    generation_service_pb2,
    generation_service_pb2_grpc,
    kvstore_service_pb2,
    kvstore_service_pb2_grpc,
    prefill_service_pb2,
    prefill_service_pb2_grpc,
)
from services.cluster.redis_embed import EmbeddedRedis
from services.common.errors import error_info

HUNG_GRACE_S = 5.0  # a request still running at its deadline + this is hung
KV_SETTLE_S = 1.0  # "right after the load": the release RPCs are in flight this long at most
VIEW_LAG_S = 1.2  # the gateways poll the registry every 0.5 s (plus a busy host's delay)
# Ends that are a clear answer to the client: a status it can act on (never UNKNOWN or
# INTERNAL). CANCELLED only counts for requests the client cancelled itself.
CLEAR_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT,
               grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.ABORTED,
               grpc.StatusCode.CANCELLED}
NETNS = "pdfault"
NS_HOST, NS_PEER = "10.77.0.1", "10.77.0.2"
FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


def netns_possible() -> str:
    """'' when this machine lets us make a network namespace with a veth pair; else why."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2"
    probe = subprocess.run(["ip", "netns", "add", "pdprobe"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"ip netns add failed: {probe.stderr.strip()[:120]}"
    subprocess.run(["ip", "netns", "del", "pdprobe"], capture_output=True)
    return ""


def _sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


class Partition:
    """A second network namespace joined to this one by a veth pair (10.77.0.1 here,
    10.77.0.2 there). ``cut`` drops the link (both ways, silently: packets vanish, no RST),
    ``heal`` brings it back."""

    def __init__(self) -> None:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)
        subprocess.run(["ip", "link", "del", "pdf0"], capture_output=True)
        _sh("ip", "netns", "add", NETNS)
        _sh("ip", "link", "add", "pdf0", "type", "veth", "peer", "name", "pdf1")
        _sh("ip", "link", "set", "pdf1", "netns", NETNS)
        _sh("ip", "addr", "add", f"{NS_HOST}/24", "dev", "pdf0")
        _sh("ip", "link", "set", "pdf0", "up")
        _sh("ip", "netns", "exec", NETNS, "ip", "addr", "add", f"{NS_PEER}/24", "dev", "pdf1")
        _sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "pdf1", "up")
        _sh("ip", "netns", "exec", NETNS, "ip", "link", "set", "lo", "up")

    def cut(self) -> None:
        _sh("ip", "link", "set", "pdf0", "down")

    def heal(self) -> None:
        _sh("ip", "link", "set", "pdf0", "up")

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", "pdf0"], capture_output=True)
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@dataclass
class Proc:
    name: str
    role: str
    env: dict[str, str]
    popen: subprocess.Popen[bytes]
    ready: Path
    log: Path
    address: str = ""
    netns: bool = False


@dataclass
class Outcome:
    kind: str  # ok | clear | unclear | hung
    code: str = ""
    reason: str = ""
    tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0
    client_cancelled: bool = False


@dataclass
class Row:
    fault: str
    sent: int = 0
    ok: int = 0
    clear: int = 0
    unclear: int = 0
    hung: int = 0
    recovery_s: float = 0.0
    kv_held: int = 0
    notes: str = ""
    codes: dict[str, int] = field(default_factory=dict)

    def add(self, outcomes: list[Outcome]) -> None:
        self.sent += len(outcomes)
        for o in outcomes:
            setattr(self, o.kind, getattr(self, o.kind) + 1)
            if o.kind != "ok":
                key = f"{o.code}/{o.reason}" if o.reason else o.code
                self.codes[key] = self.codes.get(key, 0) + 1


class ProcCluster:
    """kvstore + prefills + decodes + gateways (+ a private redis-server), each its own
    process group. ``partition=True`` binds the host side on 0.0.0.0 so a process started
    in the second namespace (``spawn(..., netns=True)``) can reach it."""

    def __init__(self, workdir: Path, prefills: int = 2, decodes: int = 2, gateways: int = 1,
                 model: str = "tiny", partition: bool = False,
                 env: dict[str, str] | None = None,
                 proc_env: dict[str, dict[str, str]] | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.counts = {"prefill": prefills, "decode": decodes, "gateway": gateways}
        self.group = f"faults{secrets.token_hex(3)}"
        self.token = secrets.token_hex(16)
        self.procs: dict[str, Proc] = {}
        self.redis = EmbeddedRedis(str(self.dir / "redis"))
        self.partition = Partition() if partition else None
        self.extra = dict(env or {})
        # prefill-0 takes one request at a time, so the gateway's batch filler spills the
        # rest onto prefill-1 (the victim of the prefill cases) instead of packing one.
        # decode-0 batches 3: the victim decode-1 can rank last (a restarted decode that
        # fell back to tcp reports kv_fallback_rate > 0.2) and would otherwise take nothing.
        self.proc_env = proc_env if proc_env is not None else {
            "prefill-0": {"PDSERVE_SLOTS": "1"}, "decode-0": {"PDSERVE_SLOTS": "3"}}
        self._lock = threading.Lock()

    # -- lifecycle -----------------------------------------------------------------------------
    def base_env(self, netns: bool = False) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PDSERVE_")}
        env.update({
            "PDSERVE_REDIS_URL": self.redis.url, "PDSERVE_MODEL": self.model,
            "PDSERVE_GROUP": self.group, "PDSERVE_CLUSTER_TOKEN": self.token,
            "PDSERVE_HEARTBEAT_S": "0.3", "PDSERVE_REGISTRY_TTL_S": "1.5",
            "PDSERVE_GRACE_S": "1", "PDSERVE_METRICS_PORT": "-1",
            "PDSERVE_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1",
            "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1",
            "PDSERVE_KV_TRANSFER_TIMEOUT_S": "8", "PDSERVE_PORT": "0", "PDSERVE_HTTP_PORT": "-1",
        })
        if self.partition is not None:
            host = NS_PEER if netns else "0.0.0.0"
            env.update({"PDSERVE_HOST": host,
                        "PDSERVE_ADVERTISE_HOST": NS_PEER if netns else NS_HOST})
        env.update(self.extra)
        return env

    def start(self, timeout_s: float = 180) -> None:
        self.redis.start()
        self.spawn("kvstore", "kvstore")
        self.wait_ready(["kvstore"], timeout_s)
        names = [f"{r}-{i}" for r in ("prefill", "decode") for i in range(self.counts[r])]
        for n in names:
            self.spawn(n, n.split("-")[0])
        self.wait_ready(names, timeout_s)
        gws = [f"gateway-{i}" for i in range(self.counts["gateway"])]
        for n in gws:
            self.spawn(n, "gateway")
        self.wait_ready(gws, timeout_s)
        self.wait_serving(timeout_s)

    def spawn(self, name: str, role: str, env: dict[str, str] | None = None,
              netns: bool = False, faketime: str = "") -> Proc:
        ready = self.dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        log = self.dir / f"{name}.log"
        full = {**self.base_env(netns), "PDSERVE_INSTANCE_ID": name,
                "PDSERVE_READY_FILE": str(ready), **self.proc_env.get(name, {}), **(env or {})}
        if faketime:
            full.update({"LD_PRELOAD": FAKETIME_LIB, "FAKETIME": faketime,
                         "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_NO_CACHE": "1"})
        cmd = [sys.executable, "-m", f"services.{role}"]
        if netns:
            cmd = ["ip", "netns", "exec", NETNS, *cmd]
        with open(log, "ab") as fh:
            popen = subprocess.Popen(cmd, env=full, stdout=fh, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True,
                                     cwd=str(Path(__file__).resolve().parents[2]))
        proc = Proc(name, role, env or {}, popen, ready, log, netns=netns)
        self.procs[name] = proc
        return proc

    def wait_ready(self, names: list[str], timeout_s: float = 120) -> None:
        end = time.monotonic() + timeout_s
        for n in names:
            p = self.procs[n]
            while not p.ready.exists():
                if p.popen.poll() is not None:
                    raise RuntimeError(f"{n} exited {p.popen.returncode}:\n{self.tail(n)}")
                if time.monotonic() > end:
                    raise TimeoutError(f"{n} not ready in {timeout_s}s:\n{self.tail(n)}")
                time.sleep(0.05)
            p.address = str(json.loads(p.ready.read_text())["address"])

    def wait_serving(self, timeout_s: float = 60) -> float:
        """Seconds until a fresh request through gateway-0 is served (the recovery time)."""
        t0 = time.monotonic()
        while True:
            if self.probe():
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"the cluster did not serve again within {timeout_s}s")
            time.sleep(0.1)

    def probe(self, gateway: str = "gateway-0") -> bool:
        try:
            out = generate(self.procs[gateway].address, prompt_token_ids=[5, 6, 7, 8],
                           max_tokens=2, timeout=5)
            return out.kind == "ok"
        except Exception:
            return False

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[name]
        if p.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.popen.pid, sig)
            if sig == signal.SIGKILL:
                p.popen.wait(10)

    def restart(self, name: str, env: dict[str, str] | None = None, netns: bool | None = None,
                faketime: str = "", wait: bool = True) -> Proc:
        old = self.procs[name]
        self.kill(name)
        proc = self.spawn(name, old.role, env if env is not None else {},
                          old.netns if netns is None else netns, faketime)
        if wait:
            self.wait_ready([name])
            time.sleep(VIEW_LAG_S)  # until the gateways' polled registry view has it
        return proc

    def stop(self) -> None:
        for p in self.procs.values():
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGCONT)
                    os.killpg(p.popen.pid, signal.SIGTERM)
        end = time.monotonic() + 10
        for p in self.procs.values():
            try:
                p.popen.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()
        self.redis.stop()
        if self.partition is not None:
            self.partition.close()

    def tail(self, name: str, n: int = 4000) -> str:
        return self.procs[name].log.read_text(errors="replace")[-n:]

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.popen.poll() is None]

    # -- what is held --------------------------------------------------------------------------
    def kv_held(self) -> int:
        """kvstore bytes + decode pool bytes + decode active requests (0 = nothing held)."""
        total = 0
        kv = self.procs["kvstore"]
        if kv.popen.poll() is None:
            with grpc.insecure_channel(kv.address) as ch:
                total += int(kvstore_service_pb2_grpc.KvStoreServiceStub(ch).GetKvStoreStats(
                    kvstore_service_pb2.GetKvStoreStatsRequest(), timeout=5).bytes_held)
        for p in self.procs.values():
            if p.role == "decode" and p.popen.poll() is None:
                with grpc.insecure_channel(p.address) as ch:
                    s = decode_service_pb2_grpc.DecodeServiceStub(ch).GetDecodeStats(
                        decode_service_pb2.GetDecodeStatsRequest(), timeout=5)
                    total += int(s.kv_bytes_held) + int(s.active)
        return total

    def kv_held_kvstore(self) -> int:
        with grpc.insecure_channel(self.procs["kvstore"].address) as ch:
            return int(kvstore_service_pb2_grpc.KvStoreServiceStub(ch).GetKvStoreStats(
                kvstore_service_pb2.GetKvStoreStatsRequest(), timeout=5).bytes_held)

    def settled_kv(self, within_s: float = KV_SETTLE_S) -> int:
        end = time.monotonic() + within_s
        while True:
            held = self.kv_held()
            if held == 0 or time.monotonic() > end:
                return held
            time.sleep(0.05)

    def busy(self, name: str) -> int:
        p = self.procs[name]
        with grpc.insecure_channel(p.address) as ch:
            if p.role == "prefill":
                return int(prefill_service_pb2_grpc.PrefillServiceStub(ch).GetPrefillStats(
                    prefill_service_pb2.GetPrefillStatsRequest(), timeout=2).busy_slots)
            return int(decode_service_pb2_grpc.DecodeServiceStub(ch).GetDecodeStats(
                decode_service_pb2.GetDecodeStatsRequest(), timeout=2).active)

    def wait_busy(self, name: str, timeout_s: float = 15) -> bool:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with contextlib.suppress(grpc.RpcError):
                if self.busy(name) > 0:
                    return True
            time.sleep(0.02)
        return False


# -- load --------------------------------------------------------------------------------------
def generate(address: str, timeout: float, cancel_after: float | None = None,
             cancel_after_tokens: int | None = None, **kw: object) -> Outcome:
    """One request through the public API; how it ended."""
    t0 = time.monotonic()
    tokens: list[int] = []
    with grpc.insecure_channel(address) as ch:
        stub = generation_service_pb2_grpc.GenerationServiceStub(ch)
        call = stub.Generate(generation_service_pb2.GenerateRequest(**kw), timeout=timeout)
        timer = None
        if cancel_after is not None:
            timer = threading.Timer(cancel_after, call.cancel)
            timer.start()
        try:
            for msg in call:
                tokens.extend(msg.token_ids)
                if cancel_after_tokens is not None and len(tokens) >= cancel_after_tokens:
                    call.cancel()
                    break
            if cancel_after_tokens is not None and len(tokens) >= cancel_after_tokens:
                return Outcome("clear", "CANCELLED", "", tokens, time.monotonic() - t0, True)
            return Outcome("ok", tokens=tokens, seconds=time.monotonic() - t0)
        except grpc.RpcError as e:
            code = e.code()  # type: ignore[attr-defined]
            info = error_info(e)
            mine = cancel_after is not None or cancel_after_tokens is not None
            clear = code in CLEAR_CODES and (code != grpc.StatusCode.CANCELLED or mine)
            return Outcome("clear" if clear else "unclear", code.name,
                           info.reason if info is not None else "", tokens,
                           time.monotonic() - t0, mine and code == grpc.StatusCode.CANCELLED)
        finally:
            if timer is not None:
                timer.cancel()


def run_load(requests: list[dict[str, object]], address: str | Callable[[int], str],
             deadline_s: float, concurrency: int = 6,
             during: Callable[[], None] | None = None) -> list[Outcome]:
    """Send ``requests`` (GenerateRequest fields, plus cancel_after / cancel_after_tokens)
    ``concurrency`` at a time; ``during`` runs on this thread while they are in flight (the
    fault). A request not ended by deadline + HUNG_GRACE_S counts as hung."""
    pool = ThreadPoolExecutor(concurrency)
    futs: list[Future[Outcome]] = []
    for i, req in enumerate(requests):
        addr = address(i) if callable(address) else address
        futs.append(pool.submit(generate, addr, deadline_s, **req))
    t0 = time.monotonic()
    if during is not None:
        during()
    out: list[Outcome] = []
    for f in futs:
        left = deadline_s + HUNG_GRACE_S - (time.monotonic() - t0)
        # Requests start late when all workers are busy; their deadline starts then too.
        try:
            out.append(f.result(timeout=max(left, 0) + deadline_s))
        except FutureTimeout:
            out.append(Outcome("hung"))
    pool.shutdown(wait=False, cancel_futures=True)
    return out


def prompts(n: int, tokens: int = 24, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(tokens)] for _ in range(n)]
