"""From the collector's store to the feedback store (requests/, impressions/, clicks/) the pipeline reads.

The contract between the policy server and the collector, as the inference logger forwards it:

    request  payload: {"instances": [auction request, ...]}
    response payload: {"predictions": [{"request_id", "response_id", "response", "policy_version",
                        "arm", "served_at", "allocation": [{"ad_id", "advertiser_id", "position",
                        "bid"}]}]}

Every inserted ad becomes one impression event (`imp:<response_id>:<ad_id>`, the id the simulated
logs use too), so exporting the same store again changes nothing after ingest's deduplication.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from llm_auction.contracts import AuctionRequest
from llm_auction.public.feedback import CLICK_COLUMNS, IMPRESSION_COLUMNS, request_rows, write_feedback
from llm_auction.serving.collector import EventStore


def impression_rows(pairs: Iterable[tuple[str, Any, Any]]) -> pd.DataFrame:
    """One row per inserted ad of every paired (request, response) inference event."""
    rows = []
    for _, request, response in pairs:
        instances = {i["request_id"]: i for i in request.get("instances", [])}
        for prediction in response.get("predictions", []):
            instance = instances.get(prediction.get("request_id"))
            if instance is None:
                continue  # a response whose request was not logged: nothing to attribute it to
            allocation = prediction.get("allocation", [])
            for ad in allocation:
                rows.append(
                    {
                        "event_id": f"imp:{prediction['response_id']}:{ad['ad_id']}",
                        "event_timestamp": pd.Timestamp(prediction["served_at"]),
                        "request_id": instance["request_id"],
                        "response_id": prediction["response_id"],
                        "user_id": instance["user_id"],
                        "ad_id": ad["ad_id"],
                        "advertiser_id": ad["advertiser_id"],
                        "position": int(ad["position"]),
                        "n_ads": len(allocation),
                        "bid": float(ad["bid"]),
                        "policy_version": str(prediction.get("policy_version", "")),
                        "query": instance["query"],
                        "response": prediction["response"],
                    }
                )
    return pd.DataFrame(rows, columns=list(IMPRESSION_COLUMNS))


def request_log(pairs: Iterable[tuple[str, Any, Any]]) -> pd.DataFrame:
    """The request log: every auction request the server received, stamped when it was served,
    with the arm and policy version that answered it.

    A request whose response names no `served_at` (it failed) still counts; it takes the time of
    any other prediction of its event, so the log never loses an accepted request.
    """
    requests, times, arms, versions = [], [], [], []
    for _, request, response in pairs:
        predictions = response.get("predictions", [])
        served = [pd.Timestamp(p["served_at"]) for p in predictions if "served_at" in p]
        answered = {p.get("request_id"): p for p in predictions}
        for instance in request.get("instances", []):
            requests.append(AuctionRequest.model_validate(instance))
            times.append(min(served) if served else pd.NaT)
            answer = answered.get(instance.get("request_id"), {})
            arms.append(answer.get("arm"))
            versions.append(None if answer.get("policy_version") is None else str(answer["policy_version"]))
    return request_rows(requests, times, arms, versions)


def feedback_frames(store: EventStore) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(request log, impressions, clicks) of everything in the collector's store, the feedback schemas."""
    pairs = store.inference_pairs()
    impressions = impression_rows(pairs)
    clicks = pd.DataFrame(store.click_rows(), columns=list(CLICK_COLUMNS))
    clicks["event_timestamp"] = pd.to_datetime(clicks["event_timestamp"], utc=True)
    impressions["event_timestamp"] = pd.to_datetime(impressions["event_timestamp"], utc=True)
    return request_log(pairs), impressions, clicks


def export_feedback(store: EventStore, feedback_dir: Path, name: str = "collector") -> list[Path]:
    """Write the store's request log, impressions and clicks as one batch `name` of the feedback store."""
    requests, impressions, clicks = feedback_frames(store)
    return write_feedback(feedback_dir, name, impressions, clicks, requests)
