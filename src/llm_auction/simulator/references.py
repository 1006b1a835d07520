"""Upper references priced with the simulator's truth (simulation only, never called deployable).

- `pre_generation@oracle`, `post_generation@oracle`: the deployable rules ranking by the true
  standalone CTR instead of psi_t's (what perfect click prediction would buy a decoupled auction);
- `reward_greedy@oracle`: the deployable layout search (`reward_greedy`) with the truth as its
  reward, each page's expected revenue: what the same search space would earn if psi priced
  whole pages perfectly (the second ad's cost to the first, the bridges' crowding);
- `oracle_greedy`: knows the true CTR with positions, externalities, nativeness and flooding, and
  picks the ordered set and the bridges that maximise expected revenue.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llm_auction.baselines import (
    CtrEstimator,
    PostGeneration,
    PreGeneration,
    RewardGreedy,
    limit_of,
    spread_slots,
)
from llm_auction.config import Settings
from llm_auction.contracts import Allocator, AuctionRequest
from llm_auction.mechanism.grammar import parse_response, render_response
from llm_auction.mechanism.payments import expected_payments
from llm_auction.simulator.parametric import ParametricClickModel
from llm_auction.text.organic import organic_answer
from llm_auction.text.reading import bridge_for

if TYPE_CHECKING:  # the type only: psi's torch and Feast stay out of the command line's start
    from llm_auction.reward.scorer import Scorer

ORACLE_REFERENCES = (
    "pre_generation@oracle",
    "post_generation@oracle",
    "reward_greedy@oracle",
    "oracle_greedy",
)


@dataclass
class OracleGreedy:
    click_model: ParametricClickModel
    n_sentences: int
    max_ads: int
    max_layouts: int
    name: str = "oracle_greedy"

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]:
        out = []
        for r in requests:
            sentences = organic_answer(r.query, self.n_sentences, rng)
            slots = [spread_slots(n, len(sentences)) for n in range(limit_of(r, self.max_ads) + 1)]
            best = self.click_model.best_layout(r, np.asarray(r.bids), sentences, slots, self.max_layouts)
            leads = {i: str(bridge_for(r.ads[i].text)) for i, b in zip(best.order, best.bridged) if b}
            out.append(render_response(sentences, list(zip(slots[len(best.order)], best.order)), leads))
        return out


def true_standalone_ctr(click_model: ParametricClickModel) -> CtrEstimator:
    """The simulator's standalone CTR (position 1, no externalities) as a baselines' `CtrEstimator`."""
    return lambda requests: [click_model.standalone_ctr(r) for r in requests]


def true_page_revenue(click_model: ParametricClickModel, max_ads: int | None) -> Scorer:
    """Each page's expected first-price revenue under the true click model: R with a perfect psi
    (the page parsed as R parses it, at most the request's ad limit).
    """

    def score(requests: Sequence[AuctionRequest], responses: Sequence[str]) -> np.ndarray:
        values = []
        for request, response in zip(requests, responses, strict=True):
            parsed = parse_response(response, len(request.ads), request.ad_limit(max_ads))
            allocation = list(parsed.allocation)
            bids = np.asarray(request.bids, dtype=float)[allocation]
            ctr = click_model.expected_ctr(request, allocation, response)
            values.append(float(np.sum(expected_payments(bids, ctr))))
        return np.asarray(values)

    return score


def make_reference(name: str, settings: Settings, click_model: ParametricClickModel) -> Allocator:
    """An oracle reference by name (`ORACLE_REFERENCES`)."""
    b, max_ads = settings.baselines, settings.mechanism.max_ads
    truth = true_standalone_ctr(click_model)
    if name == "pre_generation@oracle":
        return PreGeneration(truth, b.organic_sentences, max_ads, b.pre_generation_bridges, name=name)
    if name == "post_generation@oracle":
        return PostGeneration(truth, b.organic_sentences, b.post_generation_slots, name=name)
    if name == "reward_greedy@oracle":
        return RewardGreedy(
            truth,
            true_page_revenue(click_model, max_ads),
            b.organic_sentences,
            b.reward_greedy_max_ads,
            b.reward_greedy_pool,
            b.reward_greedy_bridges,
            name=name,
        )
    if name == "oracle_greedy":
        return OracleGreedy(click_model, b.organic_sentences, max_ads, b.oracle_max_layouts)
    raise ValueError(
        f"policy: unknown oracle reference {name!r}; choose one of {', '.join(ORACLE_REFERENCES)}"
    )
