"""The gateway, the kvstore and the device (mock engine) start and serve health in a
process where importing torch or transformers raises: preparing a model is an explicit
step (``ensure_prepared``), and ``ModelInfo.load`` only reads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

pytestmark = pytest.mark.e2e

# Runs the service's main with an import hook that refuses torch and transformers.
BLOCKER = """
import importlib.abc, sys
class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition('.')[0] in ('torch', 'transformers'):
            raise ImportError(f'{name} is blocked: this process must not import torch')
        return None
sys.meta_path.insert(0, NoTorch())
import runpy
sys.argv = ['svc', *sys.argv[1:]]
runpy.run_module(sys.argv.pop(1), run_name='__main__')
"""


def _start(module: str, tmp: Path, env: dict[str, str], *args: str,
           ) -> tuple[subprocess.Popen[bytes], Path]:
    ready = tmp / f"{module}.ready"
    log = open(tmp / f"{module}.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKER, module, "--port", "0", "--ready-file", str(ready),
         *args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return proc, ready


def _wait_ready(proc: subprocess.Popen[bytes], ready: Path, log: Path) -> str:
    end = time.monotonic() + 90
    while time.monotonic() < end:
        if ready.exists() and ready.read_text().strip():
            return str(json.loads(ready.read_text())["address"])
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    pytest.fail(f"{log.name} did not start:\n{log.read_text()[-3000:]}")


def test_gateway_kvstore_and_device_start_without_torch(redis_url: str, tmp_path: Path,
                                                        ) -> None:
    import os

    env = {**os.environ, "PDSERVE_REDIS_URL": redis_url, "PDSERVE_MODEL": "mock:scaled-gpu",
           "PDSERVE_GROUP": "torchfree"}
    procs = []
    try:
        started = [
            ("services.kvstore", ()),
            ("services.gateway", ("--http-port", "0")),
            ("services.device", ("--engine", "mock")),
        ]
        for module, args in started:
            proc, ready = _start(module, tmp_path, env, *args)
            procs.append((module, proc, ready))
        for module, proc, ready in procs:
            address = _wait_ready(proc, ready, tmp_path / f"{module}.log")
            with grpc.insecure_channel(address) as ch:
                status = health_pb2_grpc.HealthStub(ch).Check(
                    health_pb2.HealthCheckRequest(), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, module
        for module, _, _ in procs:
            text = (tmp_path / f"{module}.log").read_text()
            assert "is blocked" not in text, f"{module} tried to import torch:\n{text[-2000:]}"
    finally:
        for _, proc, _ in procs:
            proc.terminate()
        for _, proc, _ in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_blocker_really_blocks_torch(tmp_path: Path) -> None:
    """The hook is effective: a module that imports torch fails under it."""
    run = subprocess.run([sys.executable, "-c", BLOCKER, "services.engine.runner"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0 and "is blocked" in run.stderr
