"""Run an allocation rule on requests and let simulated users react: the impression log."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llm_auction.contracts import Allocator, AuctionRequest
from llm_auction.mechanism.grammar import parse_response
from llm_auction.simulator.base import ClickModel, sample_clicks

IMPRESSION_COLUMNS = (
    "request_id",
    "user_id",
    "ad_id",
    "advertiser_id",
    "position",
    "n_ads",
    "bid",
    "value_per_click",
    "expected_ctr",
    "clicked",
)


UserUtility = Callable[[AuctionRequest, str, int], float]
"""(request, response, ads inserted) -> the user's utility of the answer (welfare's user term)."""


@dataclass(frozen=True)
class Rollout:
    """One row per request (response, ads shown, format errors) and one per ad impression."""

    policy: str
    requests: pd.DataFrame
    impressions: pd.DataFrame


def rollout(
    allocator: Allocator,
    requests: Sequence[AuctionRequest],
    click_model: ClickModel,
    values: Callable[[str, str], float],
    rng: np.random.Generator,
    max_ads: int | None,
    batch_size: int = 64,
    user_utility: UserUtility | None = None,
) -> Rollout:
    """Allocate, parse, and draw clicks; `values(request_id, ad_id)` is the value of a click.

    With `user_utility` each request row also holds the user's utility of the answer.
    """
    request_rows, impression_rows = [], []
    for start in range(0, len(requests), batch_size):
        batch = requests[start : start + batch_size]
        for request, response in zip(batch, allocator.allocate(batch, rng), strict=True):
            limit = request.ad_limit(max_ads)
            parsed = parse_response(response, len(request.ads), limit)
            ctr = click_model.expected_ctr(request, parsed.allocation, response)
            clicked = sample_clicks(ctr, rng)
            request_rows.append(
                {
                    "request_id": request.request_id,
                    "user_id": request.user_id,
                    "response": response,
                    "n_candidates": len(request.ads),
                    "n_ads": len(parsed.allocation),
                    "n_format_errors": parsed.n_errors,
                    "user_utility": (
                        user_utility(request, response, len(parsed.allocation)) if user_utility else 0.0
                    ),
                }
            )
            for position, (index, p, click) in enumerate(zip(parsed.allocation, ctr, clicked), start=1):
                ad = request.ads[index]
                impression_rows.append(
                    (
                        request.request_id,
                        request.user_id,
                        ad.ad_id,
                        ad.advertiser_id,
                        position,
                        len(parsed.allocation),
                        ad.bid,
                        values(request.request_id, ad.ad_id),
                        float(p),
                        bool(click),
                    )
                )
    impressions = pd.DataFrame(impression_rows, columns=list(IMPRESSION_COLUMNS))
    return Rollout(allocator.name, pd.DataFrame(request_rows), impressions)
