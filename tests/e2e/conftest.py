"""E2E fixtures: the real `pdserve up`, started and stopped by PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class UpProcess:
    proc: subprocess.Popen[bytes]
    log_dir: Path
    address: str

    def output(self) -> str:
        return (self.log_dir / "up.out").read_text(errors="replace")

    def ready(self, name: str) -> dict[str, object]:
        return dict(json.loads((self.log_dir / f"{name}.ready.json").read_text()))

    def child_pids(self) -> list[int]:
        return [int(json.loads(p.read_text())["pid"]) for p in self.log_dir.glob("*.ready.json")]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # our own group only
                self.proc.wait()
        return int(self.proc.returncode)


def start_up(tmp: Path, *args: str, timeout: float = 300) -> UpProcess:
    port = _free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    out = open(tmp / "up.out", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "up", "--port", str(port), "--log-dir", str(tmp),
         "--http-port", "0", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "PDSERVE_REDIS_URL": ""})
    out.close()
    up = UpProcess(proc, tmp, f"127.0.0.1:{port}")
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"pdserve up exited {proc.returncode}:\n{up.output()}")
        if "gateway listening" in up.output():
            return up
        time.sleep(0.2)
    up.stop()
    raise TimeoutError(f"pdserve up not ready:\n{up.output()}")


@pytest.fixture(scope="module")
def tiny_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    up = start_up(tmp_path_factory.mktemp("up-tiny"), "--model", "tiny", "--prefill", "2",
                  "--decode", "2")
    try:
        yield up
    finally:
        up.stop()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of ours that was reaped late still "exists"; check its state
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] != "Z"
    except OSError:
        return False
