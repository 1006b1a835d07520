#!/usr/bin/env bash
# `make images`: build the project's container images. Needs a running Docker daemon (BuildKit); where
# there is none it stops with an error, since the manifests are validated offline by `make test` instead.
#   IMAGE_REGISTRY (default ghcr.io/llm-auction), IMAGE_TAG (default: the version in pyproject.toml),
#   IMAGES (default "component component-cuda serving": a subset to build).
set -euo pipefail
cd "$(dirname "$0")/.."

registry="${IMAGE_REGISTRY:-ghcr.io/llm-auction}"
tag="${IMAGE_TAG:-$(sed -n 's/^version = "\(.*\)"$/\1/p' pyproject.toml | head -n 1)}"
images="${IMAGES:-component component-cuda serving}"

if [[ -z "$tag" || "$tag" == latest ]]; then
  echo "error: IMAGE_TAG='$tag': images are pinned to a version, never latest" >&2
  exit 2
fi
if ! command -v docker >/dev/null 2>&1; then
  echo "error: docker not found: make images needs the Docker CLI and a running daemon" >&2
  exit 1
fi
if ! docker info >/dev/null 2>&1; then
  echo "error: no Docker daemon reachable (docker info failed): make images builds only where one runs;" \
    "make test validates the manifests without it" >&2
  exit 1
fi

for image in $images; do
  DOCKER_BUILDKIT=1 docker build --file "infra/images/${image}.Dockerfile" --tag "${registry}/${image}:${tag}" .
done
