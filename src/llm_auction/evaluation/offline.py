"""Offline evaluation on held-out requests, the reward model's side: what production can measure.

Each policy writes one sampled response per request; psi_t prices them. Per request: R (Eq. 5),
the expected revenue under psi (first-price: sum of b_i * pCTR_i), the clicks psi expects, ads
shown and format errors; metrics are bootstrapped over requests. The same responses are kept, so
that in simulation the oracle (`simulator.oracle`) scores exactly these samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from llm_auction.config import Settings
from llm_auction.contracts import Allocator, AuctionRequest
from llm_auction.mechanism.metrics import Estimate, bootstrap
from llm_auction.reward.scorer import RewardScorer


def sample_responses(allocator: Allocator, requests: Sequence[AuctionRequest], seed: int) -> list[str]:
    """One response per request, seeded so that every policy of a comparison sees the same stream."""
    return allocator.allocate(list(requests), np.random.default_rng([seed, 1]))


def price_responses(
    scorer: RewardScorer, requests: Sequence[AuctionRequest], responses: Sequence[str]
) -> pd.DataFrame:
    """One row per request: the response, R, psi's expected revenue and clicks, ads and format errors."""
    scored = scorer.score(requests, responses)
    ads = scored.ads
    per = (
        ads.groupby("response_number")[["expected_payment", "pctr"]].sum()
        if len(ads)
        else pd.DataFrame(columns=["expected_payment", "pctr"], dtype=float)
    )
    per = per.reindex(range(len(responses)), fill_value=0.0)
    n_ads = ads.groupby("response_number").size().reindex(range(len(responses)), fill_value=0)
    return pd.DataFrame(
        {
            "request_id": [r.request_id for r in requests],
            "response": list(responses),
            "reward": scored.rewards,
            "revenue": per["expected_payment"].to_numpy(float),
            "clicks": per["pctr"].to_numpy(float),
            "n_ads": n_ads.to_numpy(int),
            "n_format_errors": scored.format_errors,
        }
    )


def reward_model_metrics(priced: pd.DataFrame, settings: Settings, seed: int) -> dict[str, Estimate]:
    """The reward model's metrics of one policy's priced responses, with bootstrap intervals."""
    m = settings.mechanism
    rng = np.random.default_rng([seed, 3])
    ads = priced["n_ads"].to_numpy(float)

    def boot(values: np.ndarray, denominator: np.ndarray | None = None) -> Estimate:
        return bootstrap(values, denominator, m.bootstrap_samples, m.ci_level, rng)

    return {
        "reward": boot(priced["reward"].to_numpy(float)),
        "revenue": boot(priced["revenue"].to_numpy(float)),
        "itctr": boot(priced["clicks"].to_numpy(float), ads),
        "ad_load": boot(ads),
        "fill_rate": boot((ads > 0).astype(float)),
        "format_error_rate": boot((priced["n_format_errors"].to_numpy() > 0).astype(float)),
    }
