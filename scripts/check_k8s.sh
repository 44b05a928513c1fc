#!/usr/bin/env bash
# Render every kustomization under deploy/k8s with `kubectl kustomize` (offline) and validate
# the output with kubernetes-validate --strict against the Kubernetes 1.32 schemas it bundles
# (PyPI, the dev extra). No API server is needed: `kubectl apply --dry-run=client` would be.
#
#   bash scripts/check_k8s.sh                 # deploy/k8s
#   K8S_DIR=/tmp/k8s bash scripts/check_k8s.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DIR=${K8S_DIR:-deploy/k8s}
VALIDATE=${KUBERNETES_VALIDATE:-$ROOT/.venv/bin/kubernetes-validate}
KVERSION=${K8S_VERSION:-1.32.0}
command -v kubectl >/dev/null || { echo "check_k8s: kubectl not found" >&2; exit 2; }
[[ -x "$VALIDATE" ]] || { echo "check_k8s: $VALIDATE not found (dev extra)" >&2; exit 2; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
n=0
while IFS= read -r k; do
  d="$(dirname "$k")"
  out="$tmp/$(echo "$d" | tr '/' '_').yaml"
  kubectl kustomize "$d" > "$out"
  "$VALIDATE" -k "$KVERSION" --strict --quiet "$out"
  n=$((n + 1))
done < <(find "$DIR" -name kustomization.yaml | sort)
echo "check_k8s: $n kustomizations rendered and valid (Kubernetes $KVERSION, strict)"
