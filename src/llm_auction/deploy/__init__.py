"""Offline checks of the Kubernetes manifests in `deploy/` and the images in `infra/`.

Nothing here talks to a cluster: overlays are rendered with `kubectl kustomize`, core kinds are checked
against Kubernetes' OpenAPI schemas, custom kinds against the add-ons' CRDs in `../shared/crds`, and every
object against the project's policies. `make test` runs it on every overlay; `make deploy` runs it before
applying one.
"""

from llm_auction.deploy.problem import Problem
from llm_auction.deploy.validate import (
    KubectlNotFoundError,
    RenderError,
    overlay_names,
    render_overlay,
    split_documents,
    validate_documents,
    validate_overlay,
)

__all__ = [
    "KubectlNotFoundError",
    "Problem",
    "RenderError",
    "overlay_names",
    "render_overlay",
    "split_documents",
    "validate_documents",
    "validate_overlay",
]
