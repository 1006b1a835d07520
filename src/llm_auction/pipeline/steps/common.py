"""What every step shares: the settings the run validated once, its parent MLflow run, its window."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from llm_auction.config import Settings, load_config
from llm_auction.tracking.runs import mlflow_client, open_run

logger = logging.getLogger(__name__)


def resolve_settings(profile: str, config_path: str = "", overrides_yaml: str = "") -> str:
    """Validate the run's configuration once; every later step reads the JSON this returns."""
    overrides = yaml.safe_load(overrides_yaml) if overrides_yaml.strip() else {}
    path = Path(config_path) if config_path else None
    return load_config(path, profile or None, overrides=overrides).model_dump_json()


def finite_metrics(values: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> dict[str, float]:
    """What KFP's Metrics artifact can hold: finite numbers; NaN (e.g. no logged loss) is left out."""
    chosen = values if keys is None else {k: values[k] for k in keys if k in values}
    return {
        k: float(v)
        for k, v in chosen.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def settings_from(settings_json: str) -> Settings:
    return Settings.model_validate_json(settings_json)


def start_epoch(settings_json: str, epoch: int, run_name: str = "") -> str:
    """The epoch's parent MLflow run, left RUNNING until the gate step (or a failing step) ends it."""
    settings = settings_from(settings_json)
    if settings.tracking.uri is None:
        return ""
    return open_run(settings.tracking, run_name or f"irpo-epoch-{epoch}", {"llm_auction.epoch": epoch}).run_id


def finish_epoch(settings_json: str, parent_run_id: str, status: str, tags: Mapping[str, Any]) -> None:
    settings = settings_from(settings_json)
    if not parent_run_id or settings.tracking.uri is None:
        return
    client = mlflow_client(settings.tracking)
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, str(value))
    client.set_terminated(parent_run_id, status=status)


@contextmanager
def failing_epoch(settings_json: str, parent_run_id: str) -> Iterator[None]:
    """A step that raises marks the epoch's parent run FAILED before the error reaches KFP."""
    try:
        yield
    except BaseException as exc:
        try:
            finish_epoch(
                settings_json, parent_run_id, "FAILED", {"llm_auction.error": f"{type(exc).__name__}: {exc}"}
            )
        except Exception as tracking_exc:  # the tracking server down too: the step's own error wins
            logger.warning("epoch run %s not marked FAILED: %s", parent_run_id, tracking_exc)
        raise


def resolve_window(window_start: str, window_end: str, hours: float) -> tuple[str, str]:
    """The feedback window; a scheduled run passes only its end (`[[ScheduledTime]]`): start = end - hours."""
    end = pd.Timestamp(window_end) if window_end else pd.Timestamp.now(tz="UTC")
    end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    start = pd.Timestamp(window_start) if window_start else end - pd.Timedelta(hours=hours)
    start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
    return start.isoformat(), end.isoformat()


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that logs, saves and registers."""
    return int(os.environ.get("RANK", "0")) == 0
