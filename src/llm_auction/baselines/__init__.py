"""Non-LLM allocation baselines."""

from llm_auction.baselines.allocators import BASELINES, make_baseline

__all__ = ["BASELINES", "make_baseline"]
