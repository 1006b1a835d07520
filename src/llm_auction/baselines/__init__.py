"""Non-LLM allocation baselines a platform could deploy (priced with the learned pCTR)."""

from llm_auction.baselines.allocators import (
    BASELINES,
    PRICED,
    CtrEstimator,
    PostGeneration,
    PreGeneration,
    RewardGreedy,
    limit_of,
    make_baseline,
    spread_slots,
)

__all__ = [
    "BASELINES",
    "PRICED",
    "CtrEstimator",
    "PostGeneration",
    "PreGeneration",
    "RewardGreedy",
    "limit_of",
    "make_baseline",
    "spread_slots",
]
