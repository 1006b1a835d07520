"""Step 1: the feedback window into Feast."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from llm_auction.features.encoder import encoder_for
from llm_auction.features.ingest import IngestReport, ingest_window
from llm_auction.features.store import open_store
from llm_auction.pipeline.steps.common import resolve_window, settings_from
from llm_auction.public.catalog import Catalog
from llm_auction.tracking.runs import tracked_run


def ingest(
    settings_json: str, feedback_dir: str, window_start: str, window_end: str, parent_run_id: str
) -> dict:
    """Step 1: the feedback window into Feast (validated, labeled, statistics, materialized).

    Users and ads come from the platform's catalog export, never from anywhere else.
    """
    settings = settings_from(settings_json)
    window_start, window_end = resolve_window(window_start, window_end, settings.features.window_hours)
    if not Path(feedback_dir).is_dir():
        raise FileNotFoundError(f"feedback_dir {feedback_dir}: not a folder")
    catalog = Catalog.load(settings.public_dir)
    encoder = encoder_for(settings)
    report: IngestReport = ingest_window(
        open_store(settings),
        settings,
        Path(feedback_dir),
        catalog.users,
        catalog.ads,
        window_start,
        window_end,
        encoder,
    )
    encoder.flush()
    summary = json.loads(json.dumps(dataclasses.asdict(report), default=str))
    with tracked_run(
        settings.tracking, "ingest", {"llm_auction.step": "ingest"}, parent_run_id or None
    ) as run:
        if run is not None:
            run.log_params({"window": report.window, "feedback_dir": feedback_dir})
            run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
    return summary
