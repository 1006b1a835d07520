"""The interface every click model implements: the simulated user behind an impression."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from llm_auction.contracts import AuctionRequest


class UnknownEntityError(KeyError):
    """A request names a user, query or ad the click model has no ground truth for."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown entity"


class ClickModel(Protocol):
    """Gives the probability that the user clicks each ad inserted in a response."""

    def expected_ctr(
        self, request: AuctionRequest, allocation: Sequence[int], response: str | None = None
    ) -> np.ndarray:
        """Click probability of each inserted ad, in allocation order (position 1 first).

        Args:
            request: the auction request the response answers.
            allocation: 0-based candidate indices in the order they appear in the response.
            response: the response text, for models that read it (the LLM judge); may be None.
        """
        ...


def sample_clicks(ctr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seeded Bernoulli clicks for the given click probabilities."""
    return rng.random(len(ctr)) < ctr
