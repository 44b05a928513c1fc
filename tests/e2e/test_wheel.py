"""A non-editable install serves: build the wheel, install it into a fresh venv, and run
`pdserve up --engine mock` from there (outside the source tree), then generate.

The fresh venv finds its third-party dependencies through a .pth line pointing at the
test venv's site-packages (installing torch and friends again would take minutes); the
project itself, package data included, comes only from the wheel: the test venv's
editable hook is a .pth *file* in that directory, and .pth files of a directory added
this way are not run."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_install_serves_the_mock_engine(tmp_path: Path) -> None:
    # Build from a clean copy of the sources: setuptools builds in-tree, and a build/ left
    # in the checkout by an earlier build could hold stale modules.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "out", "img"))
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(dist), str(src)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("pdserve-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run(
        [str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps",
         str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-3000:]

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PDSERVE_REDIS_URL"] = ""
    where = subprocess.run([str(py), "-c", "import services, json; print(services.__file__)"],
                           cwd=work, capture_output=True, text=True, env=env, check=True)
    assert where.stdout.startswith(str(site)), where.stdout  # the wheel's copy, not the tree

    log = work / "up.out"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "pdserve"), "up", "--engine", "mock", "--profile",
             "scaled-gpu", "--port", "0", "--http-port", "-1", "--log-dir", str(work / "logs")],
            cwd=work, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        address = ""
        end = time.monotonic() + 180
        while time.monotonic() < end and not address:
            assert proc.poll() is None, log.read_text()
            for line in log.read_text().splitlines():
                if "gateway listening on" in line:
                    address = line.rsplit(" ", 1)[-1]
            time.sleep(0.2)
        assert address, log.read_text()
        gen = subprocess.run(
            [str(venv / "bin" / "pdserve"), "generate", "--address", address, "--max-tokens",
             "4", "hello"], cwd=work, capture_output=True, text=True, env=env, timeout=120)
        assert gen.returncode == 0, gen.stderr + log.read_text()
        assert "ttft" in gen.stdout + gen.stderr
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
