"""``pdserve up``: the whole cluster as separate OS processes on one machine, supervised.

Lifecycle:
  1. Redis: ``PDSERVE_REDIS_URL`` if set, else a private embedded redis-server (with a
     parent-death signal, like every child).
  2. Prepare the model once (so N workers do not convert it N times).
  3. Spawn kvstore, the prefill and decode workers (per-role processes, or
     role-switchable ``services.worker`` processes with ``--switchable``), ``--spares``
     idle workers, the gateway and (``--admin``) the admin service
     (``python -m services.<module>``), each in its own session with a parent-death
     signal, logging to a file.
  4. Wait until each has written its ready file and answers SERVING on gRPC health;
     then print the gateway address.
  5. Supervise (``Launcher.supervise``, every 0.2 s) until Ctrl-C / SIGTERM:
     - a child that dies is marked removed in the registry at once (nothing more is
       routed or transferred to it; P/D-Serve §1.4), then substituted: a prefill or
       decode's role goes to an idle spare if there is one (a role switch: the spare
       already holds the weights) and a new spare is started in its place; otherwise
       the child is restarted with the same settings after a backoff (0.5 s, doubling
       while it keeps dying within 30 s of its start, at most 30 s). The cluster keeps
       serving throughout.
     - a dead embedded Redis is restarted on the same socket; services re-register at
       their next heartbeat.
     Every event goes to ``supervisor.jsonl`` in the log directory.
  6. On Ctrl-C / SIGTERM: stop the gateway and admin first, then the workers, then the
     kvstore and Redis: SIGTERM, wait, SIGKILL only what is left. Only processes this
     launcher started are signalled. If the launcher itself is killed (even SIGKILL),
     every child, redis-server included, gets SIGTERM from the kernel
     (PR_SET_PDEATHSIG), so nothing is orphaned.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.cluster.redis_embed import EmbeddedRedis
from services.common.auth import CLUSTER_TOKEN_HEADER
from services.common.config import env_str

STABLE_S = 30.0  # a child that lived this long restarts after the base backoff again
WORKER_ROLES = ("prefill", "decode", "idle")


# Runs first in every child (after exec, so no Python runs between fork and exec: a
# preexec_fn can deadlock in a launcher whose gRPC threads hold locks at the fork; one
# did, in the substitution bench): the kernel sends SIGTERM when the launcher dies,
# even by SIGKILL; if it is already gone (a race with the spawn), the child ends at
# once. Then it runs the module (-m) or execs the program (the signal survives exec).
_BOOT = """
import ctypes, os, runpy, signal, sys
ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
if sys.argv[2] == "-m":
    sys.argv = [sys.argv[3], *sys.argv[4:]]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    os.execv(sys.argv[2], sys.argv[2:])
"""


def bound_to_launcher(argv: list[str]) -> list[str]:
    """``argv`` run so that it dies with this process (see ``_BOOT``)."""
    return [sys.executable, "-c", _BOOT, str(os.getpid()), *argv]


class SupervisedRedis(EmbeddedRedis):
    """The embedded redis-server, also bound to the launcher's life (parent-death
    signal), so a killed launcher leaves no redis-server behind."""

    def launch_argv(self, args: list[str]) -> list[str]:
        return bound_to_launcher(args)


@dataclass(frozen=True)
class Spec:
    """How to (re)start one child."""

    name: str  # also its instance id
    role: str  # what it serves: kvstore, prefill, decode, idle, gateway, admin
    module: str  # python -m services.<module>
    group: str
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Child:
    name: str
    role: str
    proc: subprocess.Popen[bytes]
    log: Path
    ready: Path
    address: str = ""
    spec: Spec | None = None
    started: float = 0.0  # monotonic


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
    # Role-switchable workers (services/worker) instead of per-role processes.
    switchable: bool = False
    spares: int = 0  # idle workers kept in the spare pool (switchable workers)
    admin: bool = False  # run the admin service (pdserve group ...); on with spares
    restart_backoff_s: float = 0.5  # first restart delay; doubles while a child crash-loops
    restart_backoff_max_s: float = 30.0


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
        # The internal RPCs' shared secret (prefill, decode, kvstore refuse calls without
        # it); one per cluster unless PDSERVE_CLUSTER_TOKEN sets it.
        self.cluster_token = env_str("CLUSTER_TOKEN") or secrets.token_hex(16)
        # For operators and tests of this cluster (pdserve group, WorkerControlService),
        # readable by this user only.
        token_file = self.dir / "cluster-token"
        token_file.touch(mode=0o600)
        token_file.write_text(self.cluster_token + "\n")
        self._token_md = [(CLUSTER_TOKEN_HEADER, self.cluster_token)]
        self._stopping = False
        self._threads: dict[str, str] = {}
        self._pending: dict[str, tuple[float, Spec]] = {}  # name -> (due, spec)
        self._backoff: dict[str, float] = {}
        self._died_at: dict[str, float] = {}  # name -> when it died (for "back after")
        self._spare_seq = 0
        self._assigning: set[str] = set()  # spares taking a role right now
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="supervise")
        self._events_lock = threading.Lock()
        self.events_path = self.dir / "supervisor.jsonl"

    # -- events ----------------------------------------------------------------------
    def event(self, kind: str, name: str, **extra: object) -> None:
        rec = {"t": time.time(), "event": kind, "name": name, **extra}
        with self._events_lock, open(self.events_path, "a") as fh:
            fh.write(json.dumps(rec) + "\n")

    def say(self, msg: str) -> None:
        print(f"pdserve: {msg}", file=sys.stderr, flush=True)

    # -- spawning --------------------------------------------------------------------
    def _spawn_spec(self, spec: Spec) -> Child:
        log = self.dir / f"{spec.name}.log"
        ready = self.dir / f"{spec.name}.ready.json"
        ready.unlink(missing_ok=True)
        full_env = {**os.environ, **self.opts.extra_env, **spec.env,
                    "PDSERVE_REDIS_URL": self.redis_url, "PDSERVE_MODEL": self.opts.model,
                    "PDSERVE_READY_FILE": str(ready), "PDSERVE_INSTANCE_ID": spec.name,
                    "PDSERVE_CLUSTER_TOKEN": self.cluster_token,
                    "PDSERVE_GROUP": spec.group}
        with open(log, "ab") as fh:
            proc = subprocess.Popen(
                bound_to_launcher(["-m", f"services.{spec.module}"]), env=full_env,
                stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        child = Child(spec.name, spec.role, proc, log, ready, spec=spec,
                      started=time.monotonic())
        self.children.append(child)
        return child

    def _spawn(self, name: str, role: str, env: dict[str, str]) -> Child:
        """A per-role child (module = role), as before supervision."""
        return self._spawn_spec(Spec(name, role, role, env.get("PDSERVE_GROUP", "default"),
                                     env))

    def _worker_spec(self, name: str, role: str, group: str) -> Spec:
        env = {**self._threads}
        if role == "prefill" and self.opts.prefill_slots:
            env["PDSERVE_SLOTS" if not self._switchable() else "PDSERVE_PREFILL_SLOTS"] = \
                str(self.opts.prefill_slots)
        if self._switchable() or role == "idle":
            return Spec(name, role, "worker", group, {**env, "PDSERVE_ROLE": role})
        return Spec(name, role, role, group, env)

    def _switchable(self) -> bool:
        return self.opts.switchable

    def _new_spare(self, group: str) -> Spec:
        name = f"spare-{self._spare_seq}"
        self._spare_seq += 1
        return self._worker_spec(name, "idle", group)

    def start(self) -> str:
        if not self.redis_url:
            self.redis = SupervisedRedis(str(self.dir / "redis"))
            self.redis_url = self.redis.start()
        from services.engine.prepare import ensure_prepared

        ensure_prepared(self.opts.model)  # once, before N workers race for it
        groups = (parse_groups(self.opts.groups) if self.opts.groups
                  else [("default", self.opts.prefill, self.opts.decode)])
        first_group = groups[0][0]
        workers = sum(p + d for _, p, d in groups) + self.opts.spares
        self._threads = omp_env(workers, {**os.environ, **self.opts.extra_env})
        self._spawn_spec(Spec("kvstore", "kvstore", "kvstore", first_group))
        for g, n_p, n_d in groups:
            prefix = "" if g == "default" else f"{g}-"
            for i in range(n_p):
                self._spawn_spec(self._worker_spec(f"{prefix}prefill-{i}", "prefill", g))
            for i in range(n_d):
                self._spawn_spec(self._worker_spec(f"{prefix}decode-{i}", "decode", g))
        for _ in range(self.opts.spares):
            self._spawn_spec(self._new_spare(first_group))
        self._wait_ready()  # workers first, so the gateway's first routing table is complete
        self._spawn_spec(Spec("gateway", "gateway", "gateway", first_group, {
            "PDSERVE_HOST": self.opts.host, "PDSERVE_PORT": str(self.opts.port)}))
        if self.opts.admin or self.opts.spares:
            self._spawn_spec(Spec("admin", "admin", "admin", first_group))
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
                if self._check_ready(c):
                    pending.remove(c)
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in pending)
                raise TimeoutError(f"not SERVING after {self.opts.startup_timeout_s}s: {names}")
            time.sleep(0.1)

    def _check_ready(self, c: Child) -> bool:
        if c.address:
            return True
        try:
            address = json.loads(c.ready.read_text())["address"]
        except (OSError, ValueError, KeyError):
            return False
        if self._serving(address):
            c.address = address
            return True
        return False

    @staticmethod
    def _serving(address: str) -> bool:
        try:
            with _health_channel(address) as ch:
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

    # -- supervision -----------------------------------------------------------------
    def supervise(self) -> None:
        """One round: restart a dead Redis, substitute dead children, start the restarts
        that are due, and note the ones that are back."""
        if self._stopping:
            return
        now = time.monotonic()
        if self.redis is not None and self.redis.proc is not None and \
                self.redis.proc.poll() is not None:
            self._restart_redis()
        for c in [c for c in self.children if c.proc.poll() is not None]:
            self.children.remove(c)
            self._on_death(c, now)
        for name, (due, spec) in list(self._pending.items()):
            if now >= due:
                del self._pending[name]
                self._spawn_spec(spec)
                self.event("restarted", name, role=spec.role, group=spec.group)
        for c in self.children:
            if not c.address and self._check_ready(c):
                died = self._died_at.pop(c.name, None)
                self.event("serving", c.name, role=c.role, address=c.address,
                           after_s=None if died is None else round(now - died, 3))
                if died is not None:
                    self.say(f"{c.name} is back SERVING after {now - died:.1f}s")

    def _restart_redis(self) -> None:
        assert self.redis is not None and self.redis.proc is not None
        code = self.redis.proc.returncode
        self.say(f"redis-server exited with {code}; restarting it")
        self.event("died", "redis", code=code)
        try:
            self.redis.start()
            self.event("restarted", "redis")
        except RuntimeError as e:
            self.say(f"redis restart failed, retrying: {e}")

    def _on_death(self, c: Child, now: float) -> None:
        spec = c.spec or Spec(c.name, c.role, c.role, "default")
        code = c.proc.returncode
        self._died_at[c.name] = now
        c.ready.unlink(missing_ok=True)  # the directory tells only live addresses
        spec = self._mark_removed(spec)
        self.event("died", c.name, role=spec.role, group=spec.group, code=code)
        lived = now - c.started
        spare = self._free_spare() if spec.role in ("prefill", "decode") else None
        if spare is not None:
            self.say(f"{c.name} ({spec.role}@{spec.group}) exited with {code}; its role goes "
                     f"to spare {spare.name}, and a new spare starts")
            self._hand_to_spare(spare, spec)
            new = self._new_spare(spec.group)
            self._pending[new.name] = (now, new)
            self._died_at[new.name] = now
            return
        back = self._backoff.get(c.name, self.opts.restart_backoff_s)
        back = self.opts.restart_backoff_s if lived > STABLE_S else back
        self._backoff[c.name] = min(back * 2, self.opts.restart_backoff_max_s)
        self.say(f"{c.name} exited with {code}; restarting in {back:.1f}s\n{self.tail(c, 5)}")
        self._pending[c.name] = (now + back, spec)

    def _free_spare(self) -> Child | None:
        """A spare that is idle now: asked, not assumed (``pdserve group`` or the
        controller may have given it a role since the launcher started it)."""
        from pdserve.v1 import admin_service_pb2 as apb
        from pdserve.v1 import admin_service_pb2_grpc as apb_grpc

        for c in self.children:
            if c.role != "idle" or not c.address or c.name in self._assigning or \
                    c.proc.poll() is not None:
                continue
            try:
                with grpc.insecure_channel(c.address) as ch:
                    st = apb_grpc.WorkerControlServiceStub(ch).GetWorkerStatus(
                        apb.GetWorkerStatusRequest(), timeout=1)
            except grpc.RpcError:
                continue
            if st.state == apb.WORKER_STATE_IDLE:
                return c
            if st.role and c.spec is not None:  # it serves now: remember what
                c.role = st.role
                c.spec = replace(c.spec, role=st.role, group=st.group,
                                 env={**c.spec.env, "PDSERVE_ROLE": st.role})
        return None

    def _hand_to_spare(self, spare: Child, spec: Spec) -> None:
        """The spare takes the dead child's role and group (in the background: a drain
        and a switch take a while); if it fails, the dead child's spec restarts."""
        from pdserve.v1 import admin_service_pb2 as apb
        from pdserve.v1 import admin_service_pb2_grpc as apb_grpc

        self._assigning.add(spare.name)
        assert spare.spec is not None
        spare.role = spec.role
        spare.spec = replace(spare.spec, role=spec.role, group=spec.group,
                             env={**spare.spec.env, "PDSERVE_ROLE": spec.role})
        t0 = time.monotonic()

        def assign() -> None:
            try:
                with grpc.insecure_channel(spare.address) as ch:
                    apb_grpc.WorkerControlServiceStub(ch).Assign(
                        apb.AssignRequest(role=spec.role, group=spec.group), timeout=300,
                        metadata=self._token_md)
                took = time.monotonic() - t0
                self.event("substituted", spec.name, by=spare.name, role=spec.role,
                           group=spec.group, assign_s=round(took, 3))
                self.say(f"{spare.name} now serves {spec.role}@{spec.group} "
                         f"(switch {took * 1e3:.0f} ms)")
            except grpc.RpcError as e:
                self.say(f"{spare.name} could not take {spec.role}: {e}; restarting "
                         f"{spec.name} instead")
                self._pending[spec.name] = (time.monotonic(), spec)
            finally:
                self._assigning.discard(spare.name)

        self._pool.submit(assign)

    def _mark_removed(self, spec: Spec) -> Spec:
        """Drop the dead child's registry record now, not when its lease lapses, and
        return its spec updated to what it really served: a worker may have been
        switched or moved (``pdserve group``, the controller) since it was started."""
        if not self.redis_url or spec.role in ("admin",):
            return spec
        import redis

        from services.cluster.keys import GROUPS_KEY, instance_key, members_key

        try:
            client = redis.Redis.from_url(self.redis_url, socket_timeout=1,
                                          socket_connect_timeout=1)
            try:
                where, role = spec.group, spec.role
                for g in sorted(x.decode() if isinstance(x, bytes) else str(x)
                                for x in client.smembers(GROUPS_KEY)):
                    raw = client.get(instance_key(g, spec.name))
                    if raw is not None:
                        where, role = g, str(json.loads(raw).get("role", role))
                        break
                with client.pipeline(transaction=True) as pipe:
                    pipe.srem(members_key(where), spec.name)
                    pipe.delete(instance_key(where, spec.name))
                    pipe.execute()
            finally:
                client.close()
        except (redis.RedisError, OSError, ValueError) as e:
            self.say(f"could not mark {spec.name} removed (its lease will lapse): {e}")
            return spec
        if spec.module != "worker" or role not in WORKER_ROLES or \
                (role, where) == (spec.role, spec.group):
            return spec
        return replace(spec, role=role, group=where, env={**spec.env, "PDSERVE_ROLE": role})

    # -- stopping --------------------------------------------------------------------
    def stop(self, grace_s: float = 10.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._pending.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        order = [["gateway", "admin"], list(WORKER_ROLES), ["kvstore"]]
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
        for c in self.children:  # anything left (an unknown role): never orphaned
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()
        if self.redis is not None:
            self.redis.stop()


def run_up(opts: UpOptions) -> int:
    launcher = Launcher(opts)
    _set_tls_roots(opts.extra_env.get("PDSERVE_TLS_CERT", ""))
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
    admin = next((c.address for c in launcher.children if c.role == "admin"), "")
    if admin:
        print(f"pdserve: admin listening on {admin} (pdserve group --admin {admin} "
              f"--cluster-token \"$(cat {launcher.dir / 'cluster-token'})\" ...)", flush=True)
    print_urls(launcher.children)
    print(f"pdserve: gateway listening on {address}", flush=True)
    while not stop_now:
        launcher.supervise()
        time.sleep(0.2)
    print("pdserve: shutting down", flush=True)
    launcher.stop()
    print("pdserve: stopped", flush=True)
    return 0


# --- the front door: where to reach it and each process's /metrics ----------------------
_TLS_ROOTS: bytes | None = None  # the gateway's certificate when it serves TLS


def _set_tls_roots(cert: str) -> None:
    global _TLS_ROOTS
    _TLS_ROOTS = Path(cert).read_bytes() if cert else None


def _health_channel(address: str) -> grpc.Channel:
    """Plaintext, except for a TLS gateway: its certificate is the trust root (self-signed
    or not, pdserve up was handed it)."""
    if _TLS_ROOTS is not None:
        try:
            with grpc.insecure_channel(address) as ch:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return grpc.insecure_channel(address)
        except grpc.RpcError:
            return grpc.secure_channel(address, grpc.ssl_channel_credentials(_TLS_ROOTS))
    return grpc.insecure_channel(address)


def print_urls(children: list[Child]) -> None:
    """The OpenAI base URL and every process's /metrics URL (from their ready files)."""
    metrics = []
    for c in children:
        try:
            ready = json.loads(c.ready.read_text())
        except (OSError, ValueError):
            continue
        if ready.get("http"):
            print(f"pdserve: OpenAI-compatible HTTP on {ready['http']}/v1", flush=True)
        if ready.get("metrics"):
            metrics.append(f"  {c.name:16} {ready['metrics']}")
    if metrics:
        print("pdserve: Prometheus /metrics:\n" + "\n".join(metrics), flush=True)
