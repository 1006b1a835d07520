#!/usr/bin/env bash
# `make deploy OVERLAY=dev`: validate one overlay offline, create its Secrets from the git-ignored
# deploy/secrets/*.env files (or check that they exist), then apply it with kubectl. The add-ons of
# infra/README.md must be installed first; kubectl's current context chooses the cluster.
set -euo pipefail
cd "$(dirname "$0")/.."

overlay="${1:?usage: infra/deploy.sh OVERLAY (one of: $(ls deploy/overlays | tr '\n' ' '))}"
python="${VENV_PYTHON:-.venv/bin/python}"
namespace=llm-auction

if ! command -v kubectl >/dev/null 2>&1; then
  echo "error: kubectl not found: make deploy applies the overlay with kubectl" >&2
  exit 1
fi
"$python" -m llm_auction.deploy "$overlay"

# The namespace first, so that the Secrets can be created before the workloads that read them.
kubectl create namespace "$namespace" --dry-run=client -o yaml | kubectl apply -f -

secret_from_env() {
  local name="$1" file="$2"
  if [[ -f "$file" ]]; then
    kubectl -n "$namespace" create secret generic "$name" --from-env-file="$file" --dry-run=client -o yaml \
      | kubectl apply -f -
  elif ! kubectl -n "$namespace" get secret "$name" >/dev/null 2>&1; then
    echo "error: Secret $name does not exist and $file is missing: copy ${file}.example to $file and fill it in" >&2
    exit 1
  fi
}
secret_from_env llm-auction-s3 deploy/secrets/s3.env
secret_from_env llm-auction-postgres deploy/secrets/postgres.env

# KServe's storage initializer finds the S3 endpoint in annotations of the Secret on llm-auction-serving.
if [[ -f deploy/secrets/s3.env ]]; then
  endpoint="$(sed -n 's/^MLFLOW_S3_ENDPOINT_URL=//p' deploy/secrets/s3.env)"
  usehttps=1
  [[ "$endpoint" == http://* ]] && usehttps=0
  kubectl -n "$namespace" annotate --overwrite secret llm-auction-s3 \
    "serving.kserve.io/s3-endpoint=${endpoint#*://}" "serving.kserve.io/s3-usehttps=${usehttps}"
fi

kubectl apply -k "deploy/overlays/$overlay"
