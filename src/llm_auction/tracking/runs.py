"""MLflow runs through an explicit client (no process-global tracking state)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from llm_auction.config import TrackingConfig
from llm_auction.errors import ServiceUnavailable

logger = logging.getLogger(__name__)


def _prepare_local_store(uri: str) -> None:
    """Sqlite needs its folder to exist before MLflow opens the file."""
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)


def mlflow_client(cfg: TrackingConfig) -> Any:
    """An MlflowClient for `cfg.uri`, once a tracking server there answers.

    MLflow retries an unreachable server for minutes; a step should instead fail in seconds, with a
    message naming the server, before it has changed anything in the registry. The retry and
    timeout settings go to MLflow through its environment variables (an operator's values win).
    """
    from mlflow.tracking import MlflowClient

    if cfg.uri is None:
        raise ValueError("tracking.uri: no MLflow tracking URI configured")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, round(cfg.http_timeout_s))))
    if cfg.uri.startswith(("http://", "https://")):
        try:
            httpx.get(f"{cfg.uri.rstrip('/')}/health", timeout=cfg.http_timeout_s)
        except httpx.HTTPError as exc:
            raise ServiceUnavailable(
                f"tracking.uri: the MLflow tracking server {cfg.uri} did not answer ({type(exc).__name__}: "
                f"{exc}); nothing was logged or changed in the registry"
            ) from exc
    _prepare_local_store(cfg.uri)
    return MlflowClient(tracking_uri=cfg.uri)


@dataclass
class TrackedRun:
    """One MLflow run; every call goes to the same tracking server through `client`."""

    client: Any
    run_id: str

    def log_params(self, params: Mapping[str, Any]) -> None:
        for key, value in params.items():
            self.client.log_param(self.run_id, key, str(value)[:6000])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            if value is not None and math.isfinite(float(value)):
                self.client.log_metric(self.run_id, key, float(value), step=step or 0)

    def log_artifacts(self, directory: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(directory), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))


def lineage_tags(step: str, lineage: Mapping[str, Any]) -> dict[str, Any]:
    """The tags every step's run and registry version carry: which step, and what it came from."""
    return {"llm_auction.step": step, **{f"lineage.{k}": v for k, v in lineage.items()}}


def open_run(
    cfg: TrackingConfig,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> TrackedRun:
    """Create a RUNNING run in the configured experiment (created if needed); the caller ends it."""
    client = mlflow_client(cfg)
    experiment = client.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        location = cfg.artifact_location
        if location and "://" not in location:
            location = Path(location).resolve().as_uri()
        experiment_id = client.create_experiment(cfg.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    all_tags = {k: str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return TrackedRun(client, run.info.run_id)


@contextmanager
def tracked_run(
    cfg: TrackingConfig,
    run_name: str,
    tags: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> Iterator[TrackedRun | None]:
    """An MLflow run that ends FINISHED, or FAILED when the body raises; None when tracking is off."""
    if cfg.uri is None:
        yield None
        return
    tracked = open_run(cfg, run_name, tags, parent_run_id)
    try:
        yield tracked
    except BaseException:
        tracked.client.set_terminated(tracked.run_id, status="FAILED")
        raise
    tracked.client.set_terminated(tracked.run_id, status="FINISHED")
    logger.info("MLflow run %s (%s) finished at %s", tracked.run_id, run_name, cfg.uri)
