#!/usr/bin/env bash
# The test command: install, check generated code, lint, type-check, validate compose and
# the Kubernetes manifests, run all tests (import contracts run as tests/unit).
#   scripts/test.sh            everything (unit, integration, e2e incl. one SmolLM2 e2e)
#   scripts/test.sh -m unit    any extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=1
PY=.venv/bin/python
echo "== generated code is up to date"
$PY scripts/gen_protos.py --check
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy (services/; settings in pyproject.toml)"
.venv/bin/mypy
echo "== compose file"
PYTHON=$PY bash scripts/check_compose.sh
# --- Kubernetes manifests (deploy/k8s): up to date, rendered by kubectl kustomize, valid ---
echo "== kubernetes manifests"
if ! command -v kubectl >/dev/null; then  # Debian/apt package "kubectl" (kustomize built in)
  apt-get install -y -q kubectl >/dev/null 2>&1 || \
    { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q kubectl >/dev/null 2>&1; } || \
    echo "test.sh: kubectl could not be installed; the k8s render tests will skip" >&2
fi
$PY scripts/gen_k8s.py --check
if command -v kubectl >/dev/null; then bash scripts/check_k8s.sh; fi
# --- end Kubernetes manifests ---
echo "== model cache (tiny + SmolLM2, converted once)"
.venv/bin/pdserve model prepare --model tiny
.venv/bin/pdserve model prepare --model smollm2
echo "== pytest"
exec $PY -m pytest -p no:cacheprovider "$@"
