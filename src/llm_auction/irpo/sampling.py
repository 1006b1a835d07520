"""Step 3 of an IRPO epoch: M responses per prompt from pi_{t-1}, each scored by the reward R."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from llm_auction.config import IRPOConfig, Settings
from llm_auction.contracts import AuctionRequest
from llm_auction.features.encoder import TextEncoder
from llm_auction.irpo.pairs import build_pairs, pair_statistics
from llm_auction.mechanism.grammar import parse_response
from llm_auction.policy.allocator import prompts_for
from llm_auction.policy.generation import Generator
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

    def flush(self) -> None:
        """Keep the text embeddings computed so far (the next step reuses them)."""
        self.encoder.flush()


def bid_sum_scorer(requests: Sequence[AuctionRequest], responses: Sequence[str], max_ads: int) -> np.ndarray:
    """R with every pCTR set to 1 (the bids of the inserted ads): a reward that needs no trained model.

    For benchmarks and tests of the DPO and evaluation machinery, where any reward will do.
    """
    return np.array(
        [
            sum(q.ads[i].bid for i in parse_response(y, len(q.ads), q.max_ads or max_ads).allocation)
            for q, y in zip(requests, responses, strict=True)
        ],
        dtype=float,
    )


def feast_reward_scorer(settings: Settings, pctr_dir: Path) -> RewardScorer:
    """R under the pCTR model in `pctr_dir`, user and ad features from Feast's online store."""
    from llm_auction.features.retrieval import online_lookups
    from llm_auction.features.store import open_store

    encoder = TextEncoder(cache_path=settings.data_dir / "encoder-cache.parquet")
    users, ads = online_lookups(open_store(settings), settings.features)
    pctr = PCTRModel.load(pctr_dir)
    return RewardScorer(pctr, encoder, users, ads, settings.reward.lambda_page, settings.mechanism.max_ads)


def prompt_requests(
    train: Sequence[AuctionRequest],
    online_ids: Sequence[str],
    cfg: IRPOConfig,
    rng: np.random.Generator,
) -> list[AuctionRequest]:
    """The epoch's prompts: requests users sent in the feedback window, synthetic ones, or both.

    `train` is every request the policy may learn from (never the held-out ones); `online_ids` are
    the request ids of the logged impressions. `online` takes at most those; without any online
    request every source falls back to the synthetic stream rather than training on nothing.
    """
    by_id = {r.request_id: r for r in train}
    online = [by_id[i] for i in dict.fromkeys(online_ids) if i in by_id]
    synthetic = [r for r in train if r.request_id not in set(online_ids)] or list(train)
    n_online = {"online": cfg.n_prompts, "synthetic": 0, "mixed": cfg.n_prompts // 2}[cfg.prompt_source]
    n_online = min(n_online, len(online))
    chosen = [online[i] for i in rng.choice(len(online), n_online, replace=False)] if n_online else []
    n_synthetic = 0 if cfg.prompt_source == "online" and online else cfg.n_prompts - n_online
    n_synthetic = min(n_synthetic, len(synthetic))
    chosen += [synthetic[i] for i in rng.choice(len(synthetic), n_synthetic, replace=False)]
    return chosen


@dataclass(frozen=True)
class PreferenceSet:
    """Everything step 3 produced: every scored sample, the pairs, and their statistics."""

    samples: pd.DataFrame
    pairs: pd.DataFrame
    stats: dict[str, float]


def build_preference_set(
    generator: Generator,
    scorer: Scorer,
    requests: Sequence[AuctionRequest],
    profiles: Mapping[str, str],
    cfg: IRPOConfig,
    seed: int,
    chunk: int = 256,
) -> PreferenceSet:
    """Sample, score and pair, a chunk of prompts at a time (one progress bar for the whole set)."""
    prompts = prompts_for(requests, profiles)
    samples: list[list[str]] = []
    rewards: list[np.ndarray] = []
    m = cfg.m_samples
    with tqdm(total=len(prompts), desc="sample + score", unit="prompt", leave=False) as bar:
        for start in range(0, len(prompts), chunk):
            batch = prompts[start : start + chunk]
            drawn = generator.generate(batch, m, seed + start)
            flat_requests = [r for r in requests[start : start + chunk] for _ in range(m)]
            scores = scorer(flat_requests, [s for group in drawn for s in group]).reshape(len(batch), m)
            samples.extend(drawn)
            rewards.extend(scores)
            bar.update(len(batch))
    request_ids = [r.request_id for r in requests]
    pairs = build_pairs(request_ids, prompts, samples, rewards, cfg.delta_th)
    table = pd.DataFrame(
        {
            "request_id": np.repeat(request_ids, m),
            "sample": np.tile(np.arange(m), len(requests)),
            "response": [s for group in samples for s in group],
            "reward": np.concatenate(rewards) if rewards else np.array([], dtype=float),
        }
    )
    stats = pair_statistics(pairs, len(requests))
    stats["reward_sampled_mean"] = float(table["reward"].mean()) if len(table) else float("nan")
    stats["m_samples"] = float(m)
    stats["delta_th"] = float(cfg.delta_th)
    return PreferenceSet(table, pairs, stats)
