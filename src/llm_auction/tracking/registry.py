"""The MLflow model registry: a logged artifact folder becomes a version of a registered model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from llm_auction.config import TrackingConfig


def register_version(
    cfg: TrackingConfig,
    name: str,
    run_id: str,
    artifact_path: str,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Create the registered model if needed and add the run's artifacts as a new version."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cfg.uri)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(
        name,
        source,
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
        description=description,
    )
    return str(version.version)
