"""``pdserve up``: the whole cluster as separate OS processes on one machine.

Lifecycle:
  1. Redis: ``PDSERVE_REDIS_URL`` if set, else a private embedded redis-server.
  2. Prepare the model once (so N workers do not convert it N times).
  3. Spawn kvstore, N prefill, M decode and the gateway (``python -m services.<role>``),
     each in its own session with a parent-death signal, logging to a file.
  4. Wait until each has written its ready file and answers SERVING on gRPC
     health; then print the gateway address.
  5. On Ctrl-C / SIGTERM, or if any child dies: stop the gateway first, then the
     workers, then the kvstore and Redis: SIGTERM, wait, SIGKILL only what is left.
     Only processes this launcher started are signalled.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import env_str
from services.common.redis_embed import EmbeddedRedis

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: if the launcher dies (even SIGKILL), so do we."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready: Path
    address: str = ""


@dataclass
class UpOptions:
    prefill: int = 1
    decode: int = 1
    model: str = "smollm2"
    host: str = "127.0.0.1"
    port: int = 50051
    log_dir: str = ""
    startup_timeout_s: float = 300.0
    groups: str = ""  # "name:NpMd,..." (several scenario groups); overrides prefill/decode
    prefill_slots: int = 0  # b_p; 0 keeps the worker default
    extra_env: dict[str, str] = field(default_factory=dict)


def parse_groups(spec: str) -> list[tuple[str, int, int]]:
    """'code:2p1d,conv:3p2d' -> [('code', 2, 1), ('conv', 3, 2)]."""
    out: list[tuple[str, int, int]] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, shape = part.partition(":")
        if any(name == seen for seen, _, _ in out):
            raise ValueError(f"group {name!r} is given twice")
        shape = shape.lower()
        if not name or "p" not in shape or not shape.endswith("d"):
            raise ValueError(f"bad group {part!r}; expected name:<N>p<M>d, e.g. code:2p1d")
        p, _, d = shape[:-1].partition("p")
        if not (p.isdigit() and d.isdigit()) or int(p) < 1 or int(d) < 1:
            raise ValueError(f"bad group {part!r}; each group needs >= 1 prefill and >= 1 decode")
        out.append((name, int(p), int(d)))
    if not out:
        raise ValueError("no groups given")
    return out


def omp_env(workers: int, user_env: Mapping[str, str]) -> dict[str, str]:
    """OpenMP settings for ``workers`` model processes that share this host's cores.

    Each worker keeps one torch thread per core (a lone request gets every core), but
    its OpenMP threads sleep when idle instead of spin-waiting. With the default
    spin-wait, a prefill and a decode each burning 2 threads on 2 cores ran 6x slower
    (12 against 75 tok/s at 8 streams); with 1 thread each, a lone prefill took 1.6x as
    long (docs/engine.md). The user's own setting wins."""
    if workers < 2 or "OMP_WAIT_POLICY" in user_env:
        return {}
    return {"OMP_WAIT_POLICY": "PASSIVE"}


class Launcher:
    def __init__(self, opts: UpOptions) -> None:
        self.opts = opts
        self.dir = Path(opts.log_dir or tempfile.mkdtemp(prefix="pdserve-up-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.redis: EmbeddedRedis | None = None
        self.redis_url = env_str("REDIS_URL")
        self._stopping = False

    def _spawn(self, name: str, role: str, env: dict[str, str]) -> Child:
        log = self.dir / f"{name}.log"
        ready = self.dir / f"{name}.ready.json"
        ready.unlink(missing_ok=True)
        full_env = {**os.environ, **self.opts.extra_env, **env,
                    "PDSERVE_REDIS_URL": self.redis_url, "PDSERVE_MODEL": self.opts.model,
                    "PDSERVE_READY_FILE": str(ready), "PDSERVE_INSTANCE_ID": name}
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"services.{role}"], env=full_env, stdout=fh,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                preexec_fn=_die_with_parent)
        child = Child(name, role, proc, log, ready)
        self.children.append(child)
        return child

    def start(self) -> str:
        if not self.redis_url:
            self.redis = EmbeddedRedis(str(self.dir / "redis"))
            self.redis_url = self.redis.start()
        from services.engine.prepare import ensure_prepared

        ensure_prepared(self.opts.model)  # once, before N workers race for it
        groups = (parse_groups(self.opts.groups) if self.opts.groups
                  else [("default", self.opts.prefill, self.opts.decode)])
        first_group = groups[0][0]
        threads = omp_env(sum(p + d for _, p, d in groups), {**os.environ, **self.opts.extra_env})
        self._spawn("kvstore", "kvstore", {"PDSERVE_GROUP": first_group})
        for g, n_p, n_d in groups:
            prefix = "" if g == "default" else f"{g}-"
            for i in range(n_p):
                env = {"PDSERVE_GROUP": g, **threads}
                if self.opts.prefill_slots:
                    env["PDSERVE_SLOTS"] = str(self.opts.prefill_slots)
                self._spawn(f"{prefix}prefill-{i}", "prefill", env)
            for i in range(n_d):
                self._spawn(f"{prefix}decode-{i}", "decode", {"PDSERVE_GROUP": g, **threads})
        self._wait_ready()  # workers first, so the gateway's first routing table is complete
        self._spawn("gateway", "gateway", {
            "PDSERVE_GROUP": first_group, "PDSERVE_HOST": self.opts.host,
            "PDSERVE_PORT": str(self.opts.port)})
        self._wait_ready()
        return next(c.address for c in self.children if c.role == "gateway")

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.opts.startup_timeout_s
        pending = [c for c in self.children if not c.address]
        while pending:
            for c in list(pending):
                if c.proc.poll() is not None:
                    raise RuntimeError(f"{c.name} exited with {c.proc.returncode} during "
                                       f"startup:\n{self.tail(c)}")
                if c.ready.exists() and self._serving(json.loads(c.ready.read_text())["address"]):
                    c.address = json.loads(c.ready.read_text())["address"]
                    pending.remove(c)
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise TimeoutError(f"not SERVING after {self.opts.startup_timeout_s}s: {names}")
            time.sleep(0.1)

    @staticmethod
    def _serving(address: str) -> bool:
        try:
            with grpc.insecure_channel(address) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                return bool(r.status == health_pb2.HealthCheckResponse.SERVING)
        except grpc.RpcError:
            return False

    @staticmethod
    def tail(c: Child, lines: int = 30) -> str:
        try:
            return "\n".join(c.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def dead_child(self) -> Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, grace_s: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        order = [["gateway"], ["prefill", "decode"], ["kvstore"]]
        for roles in order:
            batch = [c for c in self.children if c.role in roles and c.proc.poll() is None]
            for c in batch:
                c.proc.send_signal(signal.SIGTERM)
            end = time.monotonic() + grace_s
            for c in batch:
                try:
                    c.proc.wait(max(0.1, end - time.monotonic()))
                except subprocess.TimeoutExpired:
                    c.proc.kill()
                    c.proc.wait()
        if self.redis is not None:
            self.redis.stop()


def run_up(opts: UpOptions) -> int:
    launcher = Launcher(opts)
    stop_now = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop_now
        stop_now = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"pdserve: starting (logs in {launcher.dir})", flush=True)
    try:
        address = launcher.start()
    except (RuntimeError, TimeoutError, ValueError) as e:
        print(f"pdserve: startup failed: {e}", file=sys.stderr, flush=True)
        launcher.stop()
        return 1
    except BaseException:
        launcher.stop()
        raise
    roles: dict[str, int] = {}
    for c in launcher.children:
        roles[c.role] = roles.get(c.role, 0) + 1
    print(f"pdserve: cluster SERVING ({', '.join(f'{n} {r}' for r, n in roles.items())}); "
          f"redis {launcher.redis_url}", flush=True)
    print(f"pdserve: gateway listening on {address}", flush=True)
    code = 0
    while not stop_now:
        dead = launcher.dead_child()
        if dead is not None:
            print(f"pdserve: {dead.name} exited with {dead.proc.returncode}; shutting down\n"
                  f"{launcher.tail(dead)}", file=sys.stderr, flush=True)
            code = 1
            break
        time.sleep(0.2)
    print("pdserve: shutting down", flush=True)
    launcher.stop()
    print("pdserve: stopped", flush=True)
    return code
