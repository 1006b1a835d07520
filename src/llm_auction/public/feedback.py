"""The feedback store: the request log, impressions and clicks a live endpoint collects (public side).

Written by the collector's export (or, in simulation, from simulated users' reactions); read by
ingest and by the IRPO prompts. Nothing here is hidden truth (no true CTR, no private value).
One parquet file per batch under `<kind>/<batch>.parquet`; the schemas:

    impressions: event_id, event_timestamp, request_id, response_id, user_id, ad_id, advertiser_id,
                 position, n_ads, bid, policy_version, query, response
    clicks:      event_id, event_timestamp, request_id, response_id, ad_id

    requests:    event_id, event_timestamp, request_id, user_id, query, ads, max_ads, arm,
                 policy_version
                 (`ads`: the candidates as JSON, `[{"ad_id", "advertiser_id", "text", "bid"}]`;
                 every auction request the server answered, as the collector logged it; `arm`:
                 `champion` or `challenger` while a canary runs, else empty; `policy_version`: the
                 version that answered)

A click's `event_id` is unique (the collector deduplicates on it); it refers to its impression by
(`response_id`, `ad_id`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from pydantic import ValidationError

from llm_auction.contracts import AuctionRequest

IMPRESSION_COLUMNS = (
    "event_id", "event_timestamp", "request_id", "response_id", "user_id", "ad_id", "advertiser_id",
    "position", "n_ads", "bid", "policy_version", "query", "response",
)  # fmt: skip
CLICK_COLUMNS = ("event_id", "event_timestamp", "request_id", "response_id", "ad_id")
REQUEST_COLUMNS = (
    "event_id", "event_timestamp", "request_id", "user_id", "query", "ads", "max_ads",
    "arm", "policy_version",
)  # fmt: skip
KINDS = {"impressions": IMPRESSION_COLUMNS, "clicks": CLICK_COLUMNS, "requests": REQUEST_COLUMNS}


class FeedbackFileError(ValueError):
    """A feedback file that cannot be read (corrupted, truncated, not parquet)."""


def request_rows(
    requests: Sequence[AuctionRequest],
    received_at: Sequence[pd.Timestamp],
    arms: Sequence[str | None] | None = None,
    policy_versions: Sequence[str | None] | None = None,
) -> pd.DataFrame:
    """The request log of `requests`, each received at the matching time (UTC), with the arm and
    policy version that answered it where they are known.
    """
    missing = [None] * len(requests)
    return pd.DataFrame(
        {
            "event_id": [f"req:{r.request_id}" for r in requests],
            "event_timestamp": pd.to_datetime(list(received_at), utc=True),
            "request_id": [r.request_id for r in requests],
            "user_id": [r.user_id for r in requests],
            "query": [r.query for r in requests],
            "ads": [json.dumps([a.model_dump() for a in r.ads]) for r in requests],
            "max_ads": pd.array([r.max_ads for r in requests], dtype="Int64"),
            "arm": pd.array(list(arms or missing), dtype="string"),
            "policy_version": pd.array(list(policy_versions or missing), dtype="string"),
        },
        columns=list(REQUEST_COLUMNS),
    )


def write_feedback(
    store: Path,
    name: str,
    impressions: pd.DataFrame,
    clicks: pd.DataFrame,
    requests: pd.DataFrame | None = None,
) -> list[Path]:
    """Write one batch of events to a feedback store folder as `<kind>/<name>.parquet`."""
    paths = []
    batches = {"impressions": impressions, "clicks": clicks}
    if requests is not None:
        batches["requests"] = requests
    for kind, frame in batches.items():
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
    return read_kind(store, "impressions"), read_kind(store, "clicks")


def read_kind(store: Path, kind: str) -> pd.DataFrame:
    """Every event of one kind (impressions, clicks, requests); an empty frame with the schema if none."""
    parts = sorted((store / kind).glob("*.parquet"))
    if not parts:
        return pd.DataFrame(columns=list(KINDS[kind]))
    return pd.concat([_read_part(p) for p in parts], ignore_index=True)


def logged_requests(
    store: Path, start: pd.Timestamp | None = None, end: pd.Timestamp | None = None
) -> list[AuctionRequest]:
    """The auction requests the server received in [start, end), each once, in arrival order.

    These are the IRPO epoch's online prompts: exactly what users sent, never rebuilt from elsewhere.

    Raises:
        FeedbackFileError: a row is not a valid auction request; the message names the file's row.
    """
    frame = read_kind(store, "requests")
    if frame.empty:
        return []
    ts = pd.to_datetime(frame["event_timestamp"], utc=True)
    keep = pd.Series(True, index=frame.index)
    if start is not None:
        keep &= ts >= start
    if end is not None:
        keep &= ts < end
    frame = frame[keep].assign(event_timestamp=ts[keep]).sort_values(["event_timestamp", "request_id"])
    out = []
    for row in frame.drop_duplicates("request_id").itertuples(index=False):
        try:
            out.append(
                AuctionRequest(
                    request_id=row.request_id,
                    user_id=row.user_id,
                    query=row.query,
                    ads=json.loads(row.ads),
                    max_ads=None if pd.isna(row.max_ads) else int(row.max_ads),
                )
            )
        except (ValidationError, json.JSONDecodeError, TypeError) as exc:
            raise FeedbackFileError(
                f"request log {store / 'requests'}: {row.request_id!r} is not a valid auction request "
                f"({str(exc).splitlines()[0]})"
            ) from None
    return out
