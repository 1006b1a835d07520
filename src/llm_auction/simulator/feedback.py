"""Feedback logs of simulated traffic: the impression and click events a live endpoint would collect.

They hold only what production sees (no true CTR, no private value). Schema, one file per window:

    impressions: event_id, event_timestamp, request_id, response_id, user_id, ad_id, advertiser_id,
                 position, n_ads, bid, policy_version, query, response
    clicks:      event_id, event_timestamp, request_id, response_id, ad_id

A click's `event_id` is unique (the collector deduplicates on it); it refers to its impression by
(`response_id`, `ad_id`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from llm_auction.contracts import AuctionRequest
from llm_auction.simulator.rollout import Rollout

IMPRESSION_COLUMNS = (
    "event_id", "event_timestamp", "request_id", "response_id", "user_id", "ad_id", "advertiser_id",
    "position", "n_ads", "bid", "policy_version", "query", "response",
)  # fmt: skip
CLICK_COLUMNS = ("event_id", "event_timestamp", "request_id", "response_id", "ad_id")


class FeedbackFileError(ValueError):
    """A feedback file that cannot be read (corrupted, truncated, not parquet)."""


def feedback_logs(
    result: Rollout,
    requests: Sequence[AuctionRequest],
    timestamps: pd.Series,
    policy_version: str,
    rng: np.random.Generator,
    mean_click_delay_s: float = 20.0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Impression and click events of a rollout; `timestamps` maps request_id to when it was served."""
    queries = {r.request_id: r.query for r in requests}
    shown = result.impressions.merge(result.requests[["request_id", "response"]], on="request_id")
    response_id = policy_version + ":" + shown["request_id"]
    impressions = pd.DataFrame(
        {
            "event_id": "imp:" + response_id + ":" + shown["ad_id"],
            "event_timestamp": shown["request_id"].map(timestamps).to_numpy(),
            "request_id": shown["request_id"],
            "response_id": response_id,
            "user_id": shown["user_id"],
            "ad_id": shown["ad_id"],
            "advertiser_id": shown["advertiser_id"],
            "position": shown["position"].astype("int64"),
            "n_ads": shown["n_ads"].astype("int64"),
            "bid": shown["bid"].astype(float),
            "policy_version": policy_version,
            "query": shown["request_id"].map(queries),
            "response": shown["response"],
        },
        columns=list(IMPRESSION_COLUMNS),
    )
    clicked = impressions[shown["clicked"].to_numpy()]
    delays = pd.to_timedelta(rng.exponential(mean_click_delay_s, len(clicked)), unit="s")
    clicks = pd.DataFrame(
        {
            "event_id": "clk:" + clicked["response_id"] + ":" + clicked["ad_id"],
            "event_timestamp": clicked["event_timestamp"] + delays,
            "request_id": clicked["request_id"],
            "response_id": clicked["response_id"],
            "ad_id": clicked["ad_id"],
        },
        columns=list(CLICK_COLUMNS),
    )
    return impressions.reset_index(drop=True), clicks.reset_index(drop=True)


def write_feedback(store: Path, name: str, impressions: pd.DataFrame, clicks: pd.DataFrame) -> list[Path]:
    """Append one batch of events to a feedback store folder as `<kind>/<name>.parquet`."""
    paths = []
    for kind, frame in (("impressions", impressions), ("clicks", clicks)):
        path = store / kind / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.to_parquet(path, index=False)
        paths.append(path)
    return paths


def _read_part(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
        raise FeedbackFileError(f"feedback file {path}: not readable as parquet ({exc})") from None


def read_feedback(store: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every event in a feedback store folder (empty frames with the schema when there is none).

    Raises:
        FeedbackFileError: a file of the store cannot be read; the message names it.
    """
    frames = []
    for kind, columns in (("impressions", IMPRESSION_COLUMNS), ("clicks", CLICK_COLUMNS)):
        parts = sorted((store / kind).glob("*.parquet"))
        frame = pd.concat([_read_part(p) for p in parts], ignore_index=True) if parts else None
        frames.append(frame if frame is not None else pd.DataFrame(columns=list(columns)))
    return frames[0], frames[1]
