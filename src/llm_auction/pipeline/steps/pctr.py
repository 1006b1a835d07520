"""Step 2: psi_t, the pCTR reward model, on the point-in-time training set."""

from __future__ import annotations

from pathlib import Path

from llm_auction.features.encoder import encoder_for
from llm_auction.features.ingest import labeled_impressions
from llm_auction.features.retrieval import pctr_inputs, training_frame
from llm_auction.features.store import open_store
from llm_auction.pipeline.steps.common import resolve_window, settings_from
from llm_auction.reward.training import train_and_register


def train_pctr(
    settings_json: str, out_dir: str, window_start: str, window_end: str, epoch: int, parent_run_id: str
) -> dict:
    """Step 2: psi_t on the point-in-time training set of every impression before the window's end."""
    settings = settings_from(settings_json)
    window_start, window_end = resolve_window(window_start, window_end, settings.features.window_hours)
    labeled = labeled_impressions(settings, None, window_end)
    if labeled.empty:
        raise ValueError(f"window {window_start}/{window_end}: no labeled impressions to train the pCTR on")
    frame = pctr_inputs(training_frame(open_store(settings), labeled, settings.features))
    encoder = encoder_for(settings)
    lineage = {"epoch": epoch, "window": f"{window_start}/{window_end}", "parent_run_id": parent_run_id}
    _, card = train_and_register(settings, frame, encoder, Path(out_dir), lineage)
    encoder.flush()
    return card
