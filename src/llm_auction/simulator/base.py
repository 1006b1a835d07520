"""What the simulated users share: seeded Bernoulli clicks (the click models implement `ClickModel`)."""

from __future__ import annotations

import numpy as np

from llm_auction.contracts import ClickModel
from llm_auction.errors import UnknownEntityError

__all__ = ["ClickModel", "UnknownEntityError", "sample_clicks"]


def sample_clicks(ctr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Seeded Bernoulli clicks for the given click probabilities."""
    return rng.random(len(ctr)) < ctr
