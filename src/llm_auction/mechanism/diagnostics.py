"""How an allocation rule uses bids: the signature that separates pi_0 from an auction."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm_auction.contracts import AuctionRequest
from llm_auction.mechanism.grammar import parse_response


def format_report(requests: Sequence[AuctionRequest], responses: Sequence[str], max_ads: int | None) -> dict:
    """Share of well-formed responses, ads per response and format errors by kind."""
    parsed = [
        parse_response(text, len(r.ads), r.ad_limit(max_ads))
        for r, text in zip(requests, responses, strict=True)
    ]
    errors: dict[str, int] = {}
    for p in parsed:
        for kind, count in p.errors.items():
            errors[kind] = errors.get(kind, 0) + count
    return {
        "well_formed_rate": float(np.mean([p.well_formed for p in parsed])) if parsed else float("nan"),
        "mean_ads": float(np.mean([len(p.allocation) for p in parsed])) if parsed else float("nan"),
        "format_errors": errors,
    }


def bid_sensitivity(requests: Sequence[AuctionRequest], responses: Sequence[str]) -> dict[str, float]:
    """Correlation of a candidate's bid (z-scored within its request) with being inserted, and the
    mean bid of inserted ads over the mean candidate bid. A bid-blind rule gives about 0 and 1.
    """
    z_scores, chosen, ratios = [], [], []
    for request, response in zip(requests, responses, strict=True):
        bids = np.asarray(request.bids)
        allocation = parse_response(response, len(bids), request.max_ads).allocation
        spread = bids.std()
        z_scores.extend((bids - bids.mean()) / spread if spread > 0 else np.zeros_like(bids))
        chosen.extend(i in allocation for i in range(len(bids)))
        if allocation:
            ratios.append(bids[list(allocation)].mean() / bids.mean())
    z, c = np.asarray(z_scores), np.asarray(chosen, dtype=float)
    corr = float(np.corrcoef(z, c)[0, 1]) if z.std() > 0 and c.std() > 0 else 0.0
    return {
        "bid_selection_corr": corr,
        "selected_bid_ratio": float(np.mean(ratios)) if ratios else float("nan"),
    }
