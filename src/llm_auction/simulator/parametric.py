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

import itertools
import math
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
        logit = (
            c.intercept
            + c.w_relevance * relevance
            + c.w_interest * interest
            + c.w_quality * (2 * quality - 1)
        )
        return 1.0 / (1.0 + np.exp(-logit))

    def _set_multiplier(self, cats: np.ndarray) -> np.ndarray:
        """Externalities and fatigue of showing ads of categories `cats` (..., n) together."""
        c = self.cfg
        n = cats.shape[-1]
        same = (cats[..., :, None] == cats[..., None, :]).sum(axis=-1) - 1
        return (
            (1 - c.same_category_externality) ** same
            * (1 - c.other_ad_externality) ** (n - 1 - same)
            * (1 - c.ad_load_fatigue) ** max(0, n - c.fatigue_free_ads)
        )

    def expected_ctr(
        self, request: AuctionRequest, allocation: Sequence[int], response: str | None = None
    ) -> np.ndarray:
        n = len(allocation)
        if n == 0:
            return np.zeros(0)
        cats, relevance, interest, quality = self._lookup(request, allocation)
        decay = self.cfg.position_decay ** np.arange(n)
        return self._base(relevance, interest, quality) * decay * self._set_multiplier(cats)

    def best_allocation(
        self, request: AuctionRequest, weights: np.ndarray, max_ads: int, max_subsets: int = 20000
    ) -> tuple[tuple[int, ...], float]:
        """The ordered allocation of at most `max_ads` ads maximising sum_i weights_i * ctr_i.

        Exact when the subsets number at most `max_subsets`: for a fixed set, position decay is the
        only order-dependent factor, so sorting the set by weight * ctr-without-decay is optimal
        (rearrangement inequality). Larger searches add the best next ad greedily.
        """
        k = len(request.ads)
        cats, relevance, interest, quality = self._lookup(request, range(k))
        value = np.asarray(weights, dtype=float) * self._base(relevance, interest, quality)
        max_ads = min(max_ads, k)
        n_subsets = sum(math.comb(k, s) for s in range(1, max_ads + 1))
        sizes = range(1, max_ads + 1)
        best: tuple[tuple[int, ...], float] = ((), 0.0)
        if n_subsets <= max_subsets:
            for size in sizes:
                subsets = np.array(list(itertools.combinations(range(k), size)), dtype=int)
                best = max(best, self._best_order(subsets, value, cats), key=lambda b: b[1])
            return best
        chosen: list[int] = []
        for _ in sizes:
            rest = [i for i in range(k) if i not in chosen]
            subsets = np.array([[*chosen, i] for i in rest], dtype=int)
            candidate = self._best_order(subsets, value, cats)
            if candidate[1] <= best[1]:
                break
            best, chosen = candidate, list(candidate[0])
        return best

    def _best_order(
        self, subsets: np.ndarray, value: np.ndarray, cats: np.ndarray
    ) -> tuple[tuple[int, ...], float]:
        per_ad = value[subsets] * self._set_multiplier(cats[subsets])
        order = np.argsort(-per_ad, axis=1, kind="stable")
        ranked = np.take_along_axis(per_ad, order, axis=1)
        totals = (ranked * self.cfg.position_decay ** np.arange(subsets.shape[1])).sum(axis=1)
        row = int(np.argmax(totals))
        return tuple(int(i) for i in subsets[row][order[row]]), float(totals[row])
