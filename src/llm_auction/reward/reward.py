"""The reward R (LLM-Auction Eq. 5): expected first-price revenue of a response under the pCTR model.

    R(x, h, a, b, y) = sum over ads i inserted in y of b_i * pCTR_i  +  lambda_page * page_score(y)

page_score is PageLLM's page-level term, here 1 for a well-formed page and 0 otherwise, so that a
positive lambda_page rewards responses a user can read without broken markers (0 by default).
One call scores a whole batch: every inserted ad of every response becomes one row for the pCTR
model, so the encoder and the network run once per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llm_auction.contracts import AuctionRequest
from llm_auction.features.encoder import TextEncoder
from llm_auction.mechanism.grammar import parse_response
from llm_auction.mechanism.payments import expected_payments
from llm_auction.reward.pctr import PCTRModel, lead_in_sentence

AdFeatures = Callable[[Sequence[str]], pd.DataFrame]
"""ad_id -> one row per id with `ad_id`, `ad_text`, `category` and any ad_* statistics (online store)."""
UserFeatures = Callable[[Sequence[str]], pd.DataFrame]
"""user_id -> one row per id with `user_id`, `profile_text` and any user_* statistics (online store)."""


@dataclass(frozen=True)
class ScoredResponses:
    """Rewards per response, its format errors, and per inserted ad the pCTR behind them."""

    rewards: np.ndarray
    ads: pd.DataFrame
    format_errors: np.ndarray
    """Format errors of each response (the parser's count; 0 for a well-formed page)."""


def impression_rows(
    requests: Sequence[AuctionRequest], responses: Sequence[str], max_ads: int | None
) -> tuple[pd.DataFrame, np.ndarray]:
    """One row per inserted ad (the pCTR input's context columns, with each ad's lead-in from this
    parse: psi need not read the response again), and each response's format errors.
    """
    rows, errors = [], []
    for number, (request, response) in enumerate(zip(requests, responses, strict=True)):
        parsed = parse_response(response, len(request.ads), request.ad_limit(max_ads))
        errors.append(parsed.n_errors)
        for position, index in enumerate(parsed.allocation, start=1):
            ad = request.ads[index]
            rows.append(
                {
                    "response_number": number,
                    "request_id": request.request_id,
                    "user_id": request.user_id,
                    "ad_id": ad.ad_id,
                    "bid": ad.bid,
                    "query": request.query,
                    "response": response,
                    "position": position,
                    "n_ads": len(parsed.allocation),
                    "ad_context": lead_in_sentence(parsed.lead_ins[position - 1]),
                }
            )
    columns = [
        "response_number",
        "request_id",
        "user_id",
        "ad_id",
        "bid",
        "query",
        "response",
        "position",
        "n_ads",
        "ad_context",
    ]
    return pd.DataFrame(rows, columns=columns), np.asarray(errors, dtype=int)


def score_responses(
    pctr: PCTRModel,
    encoder: TextEncoder,
    requests: Sequence[AuctionRequest],
    responses: Sequence[str],
    user_features: UserFeatures,
    ad_features: AdFeatures,
    lambda_page: float = 0.0,
    max_ads: int | None = None,
) -> ScoredResponses:
    """R for each (request, response) pair; requests may repeat (M samples of one prompt)."""
    rows, errors = impression_rows(requests, responses, max_ads)
    if not rows.empty:
        rows = rows.merge(ad_features(rows["ad_id"].unique().tolist()), on="ad_id", how="left")
        rows = rows.merge(user_features(rows["user_id"].unique().tolist()), on="user_id", how="left")
        rows["n_same_category"] = (
            rows.groupby(["response_number", "category"])["ad_id"].transform("count") - 1
        )
        rows["pctr"] = pctr.predict(rows, encoder)
        rows["expected_payment"] = expected_payments(rows["bid"], rows["pctr"])
        revenue = rows["expected_payment"].groupby(rows["response_number"]).sum()
    else:
        rows["pctr"] = pd.Series(dtype=float)
        rows["expected_payment"] = pd.Series(dtype=float)
        revenue = pd.Series(dtype=float)
    rewards = revenue.reindex(range(len(responses)), fill_value=0.0).to_numpy(float)
    return ScoredResponses(rewards + lambda_page * (errors == 0).astype(float), rows, errors)


def table_lookup(table: pd.DataFrame, key: str) -> Callable[[Sequence[str]], pd.DataFrame]:
    """A feature lookup backed by an in-memory table (tests, offline evaluation on a world)."""
    indexed = table.set_index(key)

    def lookup(ids: Sequence[str]) -> pd.DataFrame:
        return indexed.reindex(list(ids)).reset_index()

    return lookup
