"""R under psi as the rest of the system uses it: a batch scorer, a click model, a ranking estimate.

Everything production knows about clicks goes through here: IRPO's pairs, the reward-model side of
evaluation, the gate's audits under psi, the deployable baselines' ranking, the
ranking stage in front of the policy (`policy.ranking`) and the server's prices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llm_auction.config import Settings
from llm_auction.contracts import AuctionRequest, CtrEstimator
from llm_auction.features.encoder import TextEncoder, encoder_for
from llm_auction.features.retrieval import online_lookups
from llm_auction.features.store import open_store
from llm_auction.mechanism.grammar import marker, parse_response
from llm_auction.reward.pctr import PCTRModel
from llm_auction.reward.reward import AdFeatures, ScoredResponses, UserFeatures, score_responses

Scorer = Callable[[Sequence[AuctionRequest], Sequence[str]], np.ndarray]
"""(requests, responses) -> R of each response; requests may repeat."""


@dataclass
class RewardScorer:
    """R (Eq. 5) under one pCTR model and one pair of feature lookups; a `Scorer`."""

    pctr: PCTRModel
    encoder: TextEncoder
    user_features: UserFeatures
    ad_features: AdFeatures
    lambda_page: float
    max_ads: int
    # standalone_pctr's answers; not an init field, so `dataclasses.replace` (another psi) starts empty
    _standalone: dict[AuctionRequest, np.ndarray] = field(default_factory=dict, init=False, repr=False)

    def __call__(self, requests: Sequence[AuctionRequest], responses: Sequence[str]) -> np.ndarray:
        return self.score(requests, responses).rewards

    def score(self, requests: Sequence[AuctionRequest], responses: Sequence[str]) -> ScoredResponses:
        """R of each response and, per inserted ad, the pCTR behind it."""
        return score_responses(
            self.pctr,
            self.encoder,
            requests,
            responses,
            self.user_features,
            self.ad_features,
            self.lambda_page,
            self.max_ads,
        )

    def standalone_pctr(self, requests: Sequence[AuctionRequest]) -> list[np.ndarray]:
        """Psi of each candidate shown alone at position 1: the ranking score of decoupled auctions.

        The answer is not written yet when a pre-generation auction ranks, so each candidate is
        scored in a response holding only its own marker (one batch for all requests): the
        baselines' `CtrEstimator`. Each request's answer is kept: an evaluation lists the same
        held-out requests for each policy and each baseline ranks them again.
        """
        missing = [r for r in dict.fromkeys(requests) if r not in self._standalone]
        if missing:
            flat = [(r, y) for r in missing for y in alone(r)]
            scored = self.score([r for r, _ in flat], [y for _, y in flat])
            pctr = scored.ads.set_index("response_number")["pctr"].reindex(range(len(flat))).fillna(0.0)
            self._standalone.update(zip(missing, per_request(missing, pctr.to_numpy(float)), strict=True))
        return [self._standalone[r] for r in requests]

    def flush(self) -> None:
        """Keep the text embeddings computed so far (the next step reuses them)."""
        self.encoder.flush()


def alone(request: AuctionRequest) -> list[str]:
    """One response per candidate holding only its marker: each ad shown alone at position 1."""
    return [marker(k + 1) for k in range(len(request.ads))]


def per_request(requests: Sequence[AuctionRequest], values: Sequence[float]) -> list[np.ndarray]:
    """A flat value per candidate (requests in order, each in its candidates' order), split by request."""
    out, start = [], 0
    for request in requests:
        out.append(np.asarray(values[start : start + len(request.ads)], dtype=float))
        start += len(request.ads)
    return out


@dataclass
class PCTRClickModel:
    """psi as a `contracts.ClickModel`: the audits production can run (no hidden truth needed)."""

    scorer: RewardScorer

    def expected_ctr(
        self, request: AuctionRequest, allocation: Sequence[int], response: str | None = None
    ) -> np.ndarray:
        if not allocation:
            return np.zeros(0)
        if response is None:
            raise ValueError("response: psi reads the response text; pass it")
        return self.expected_ctr_many([request], [response])[0]

    def expected_ctr_many(
        self, requests: Sequence[AuctionRequest], responses: Sequence[str]
    ) -> list[np.ndarray]:
        """`expected_ctr` of many responses in one scoring pass, each in its allocation order."""
        ads = self.scorer.score(requests, responses).ads
        by_response = dict(tuple(ads.groupby("response_number")["pctr"])) if len(ads) else {}
        return [
            by_response[n].to_numpy(float) if n in by_response else np.zeros(0) for n in range(len(responses))
        ]


def bid_sum_scorer(requests: Sequence[AuctionRequest], responses: Sequence[str], max_ads: int) -> np.ndarray:
    """R with every pCTR set to 1 (the bids of the inserted ads): a reward that needs no trained model.

    For benchmarks and tests of the DPO and evaluation machinery, where any reward will do.
    """
    return np.array(
        [
            sum(q.ads[i].bid for i in parse_response(y, len(q.ads), q.ad_limit(max_ads)).allocation)
            for q, y in zip(requests, responses, strict=True)
        ],
        dtype=float,
    )


def ranker_for(settings: Settings, scorer: RewardScorer | None) -> CtrEstimator | None:
    """The ranking stage's pCTR (`policy.ranking: ecpm`): psi's standalone pCTR; None lists as given."""
    if settings.policy.ranking == "ecpm" and scorer is not None:
        return scorer.standalone_pctr
    return None


def feast_reward_scorer(settings: Settings, pctr_dir: Path) -> RewardScorer:
    """R under the pCTR model in `pctr_dir`, user and ad features from Feast's online store."""
    encoder = encoder_for(settings)
    users, ads = online_lookups(open_store(settings), settings.features)
    pctr = PCTRModel.load(pctr_dir)
    return RewardScorer(pctr, encoder, users, ads, settings.reward.lambda_page, settings.mechanism.max_ads)
