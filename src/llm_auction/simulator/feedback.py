"""Feedback logs of simulated traffic: the events a live endpoint would have collected from a rollout.

They hold only what production sees (the `public.feedback` schemas: no true CTR, no private value).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from llm_auction.contracts import AuctionRequest
from llm_auction.public.feedback import CLICK_COLUMNS, IMPRESSION_COLUMNS
from llm_auction.simulator.rollout import Rollout


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
    clicks = click_events(impressions[shown["clicked"].to_numpy()], rng, mean_click_delay_s)
    return impressions.reset_index(drop=True), clicks


def click_events(clicked: pd.DataFrame, rng: np.random.Generator, mean_delay_s: float = 20.0) -> pd.DataFrame:
    """The click events of the `clicked` impressions, each an exponential delay after its impression."""
    delays = pd.to_timedelta(rng.exponential(mean_delay_s, len(clicked)), unit="s")
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
    return clicks.reset_index(drop=True)
