"""The parametric click model: what a simulated user clicks, from ground truth hidden in the world.

For ad i shown at position k among the n ads of a response:

    base_i = sigmoid(intercept + w_rel * relevance(query, ad_i) + w_int * interest(user, ad_i)
                     + w_q * (2 * quality_i - 1))
    ctr_i  = base_i * decay^(k-1)                                  position bias
                    * (1 - gamma_same)^(same-category others)      competition for attention
                    * (1 - gamma_other)^(other-category others)
                    * (1 - fatigue)^max(0, n - free_ads)           ad-load fatigue

relevance is 1 for the query's own topic, 0.5 for another topic of its category, 0 otherwise;
interest is the user's interest in the ad's category relative to their strongest interest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm_auction.config import ClickModelConfig
from llm_auction.contracts import AuctionRequest
from llm_auction.simulator.base import UnknownEntityError
from llm_auction.world import CATEGORY_NAMES, World

SAME_TOPIC, SAME_CATEGORY = 1.0, 0.5


class ParametricClickModel:
    """Expected CTR and clicks from the world's hidden ground truth."""

    def __init__(self, world: World, cfg: ClickModelConfig) -> None:
        self.cfg = cfg
        cat_index = {name: i for i, name in enumerate(CATEGORY_NAMES)}
        self._ads = {
            row.ad_id: (cat_index[row.category], row.topic, float(row.quality))
            for row in world.ads.itertuples(index=False)
        }
        self._queries = {
            row.text: (cat_index[row.category], row.topic) for row in world.queries.itertuples(index=False)
        }
        self._interest = {}
        for row in world.users.itertuples(index=False):
            weights = np.asarray(row.interests, dtype=float)
            self._interest[row.user_id] = weights / max(weights.max(), 1e-12)

    def _lookup(self, request: AuctionRequest, indices: Sequence[int]) -> tuple[np.ndarray, ...]:
        try:
            query_cat, query_topic = self._queries[request.query]
        except KeyError:
            raise UnknownEntityError(f"query: no ground truth for {request.query!r}") from None
        try:
            interest = self._interest[request.user_id]
        except KeyError:
            raise UnknownEntityError(f"user_id: unknown user {request.user_id!r}") from None
        cats, relevance, quality = [], [], []
        for i in indices:
            ad_id = request.ads[i].ad_id
            if ad_id not in self._ads:
                raise UnknownEntityError(f"ads.{i}.ad_id: unknown ad {ad_id!r}")
            cat, topic, q = self._ads[ad_id]
            cats.append(cat)
            quality.append(q)
            same_cat = cat == query_cat
            relevance.append(SAME_TOPIC if same_cat and topic == query_topic else SAME_CATEGORY * same_cat)
        cats_arr = np.asarray(cats, dtype=int)
        return cats_arr, np.asarray(relevance), interest[cats_arr], np.asarray(quality)

    def standalone_ctr(self, request: AuctionRequest) -> np.ndarray:
        """CTR of each candidate shown alone in position 1: the first-order, externality-free part."""
        _, relevance, interest, quality = self._lookup(request, range(len(request.ads)))
        return self._base(relevance, interest, quality)

    def _base(self, relevance: np.ndarray, interest: np.ndarray, quality: np.ndarray) -> np.ndarray:
        c = self.cfg
        logit = c.intercept + c.w_relevance * relevance + c.w_interest * interest + c.w_quality * (2 * quality - 1)
        return 1.0 / (1.0 + np.exp(-logit))

    def expected_ctr(
        self, request: AuctionRequest, allocation: Sequence[int], response: str | None = None
    ) -> np.ndarray:
        n = len(allocation)
        if n == 0:
            return np.zeros(0)
        c = self.cfg
        cats, relevance, interest, quality = self._lookup(request, allocation)
        same = (cats[:, None] == cats[None, :]).sum(axis=1) - 1
        other = (n - 1) - same
        ctr = (
            self._base(relevance, interest, quality)
            * c.position_decay ** np.arange(n)
            * (1 - c.same_category_externality) ** same
            * (1 - c.other_ad_externality) ** other
            * (1 - c.ad_load_fatigue) ** max(0, n - c.fatigue_free_ads)
        )
        return ctr
