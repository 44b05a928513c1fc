#!/usr/bin/env bash
# The test command: install, check generated code, lint, validate compose, run all tests.
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
echo "== compose file"
PYTHON=$PY bash scripts/check_compose.sh
echo "== model cache (tiny + SmolLM2, converted once)"
.venv/bin/pdserve model prepare --model tiny
.venv/bin/pdserve model prepare --model smollm2
echo "== pytest"
exec $PY -m pytest -p no:cacheprovider "$@"
