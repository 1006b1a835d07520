"""Step 7: the admitted candidate's canary starts on the endpoint."""

from __future__ import annotations

from llm_auction.pipeline.steps.common import settings_from
from llm_auction.serving.rollout import start_canary


def deploy(settings_json: str, version: str) -> dict:
    """Start the admitted candidate's canary on the endpoint (local record, or its own predictor)."""
    return start_canary(settings_from(settings_json), version)
