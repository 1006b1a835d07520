"""Step 3 of an IRPO epoch: M responses per prompt from pi_{t-1}, each scored by the reward R."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from llm_auction.config import IRPOConfig
from llm_auction.contracts import Allocator, AuctionRequest, CtrEstimator
from llm_auction.irpo.pairs import build_pairs, pair_statistics
from llm_auction.mechanism.ranking import to_listed_markers
from llm_auction.policy.allocator import prompts_for, rank_requests
from llm_auction.policy.generation import Generator
from llm_auction.reward.scorer import Scorer


def prompt_requests(
    online: Sequence[AuctionRequest],
    synthetic: Sequence[AuctionRequest],
    cfg: IRPOConfig,
    rng: np.random.Generator,
) -> list[AuctionRequest]:
    """The epoch's prompts: requests users sent in the feedback window, synthetic ones, or both.

    `online` is the window's request log; `synthetic` the public synthetic-request file (neither
    ever holds the held-out requests). `online` takes at most the logged requests; without any,
    every source falls back to the synthetic ones rather than training on nothing.
    """
    online = list({r.request_id: r for r in online}.values())
    seen = {r.request_id for r in online}
    rest = [r for r in synthetic if r.request_id not in seen] or list(synthetic)
    n_online = {"online": cfg.n_prompts, "synthetic": 0, "mixed": cfg.n_prompts // 2}[cfg.prompt_source]
    n_online = min(n_online, len(online))
    chosen = [online[i] for i in rng.choice(len(online), n_online, replace=False)] if n_online else []
    n_synthetic = 0 if cfg.prompt_source == "online" and online else cfg.n_prompts - n_online
    n_synthetic = min(n_synthetic, len(rest))
    chosen += [rest[i] for i in rng.choice(len(rest), n_synthetic, replace=False)]
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
    ranker: CtrEstimator | None = None,
    anchors: Sequence[Allocator] = (),
) -> PreferenceSet:
    """Sample, score and pair, a chunk of prompts at a time (one progress bar for the whole set).

    With a `ranker` every step works on the requests as the prompt lists them (by bid x pCTR):
    DPO learns the responses the policy wrote for that list, and R reads them against it. Each of
    the `anchors` (`irpo.anchors`: deployable auctions) writes one more candidate per prompt after
    the M samples, scored by the same R: where it wins, it is the pair's chosen response. An
    anchor ranks the request as the platform sent it (the ranking stage's pCTR, which `ranker`
    keeps) and its response is then written for the listed order, like the samples.
    """
    given = list(requests)
    requests, orders = rank_requests(given, ranker)
    prompts = prompts_for(requests, profiles)
    samples: list[list[str]] = []
    rewards: list[np.ndarray] = []
    m = cfg.m_samples
    k = m + len(anchors)
    with tqdm(total=len(prompts), desc="sample + score", unit="prompt", leave=False) as bar:
        for start in range(0, len(prompts), chunk):
            batch, chunk_requests = prompts[start : start + chunk], requests[start : start + chunk]
            drawn = generator.generate(batch, m, seed + start)
            rng = np.random.default_rng([seed, start])
            written = [anchor.allocate(given[start : start + chunk], rng) for anchor in anchors]
            groups = [
                [*group, *(to_listed_markers(w[i], orders[start + i]) for w in written)]
                for i, group in enumerate(drawn)
            ]
            flat_requests = [r for r in chunk_requests for _ in range(k)]
            scores = scorer(flat_requests, [s for group in groups for s in group]).reshape(len(batch), k)
            samples.extend(groups)
            rewards.extend(scores)
            bar.update(len(batch))
    request_ids = [r.request_id for r in requests]
    pairs = build_pairs(request_ids, prompts, samples, rewards, cfg.delta_th)
    sources = ["policy"] * m + [anchor.name for anchor in anchors]
    table = pd.DataFrame(
        {
            "request_id": np.repeat(request_ids, k),
            "sample": np.tile(np.arange(k), len(requests)),
            "source": np.tile(sources, len(requests)),
            "response": [s for group in samples for s in group],
            "reward": np.concatenate(rewards) if rewards else np.array([], dtype=float),
        }
    )
    stats = pair_statistics(pairs, len(requests))
    sampled = table["source"] == "policy"
    stats["reward_sampled_mean"] = float(table.loc[sampled, "reward"].mean()) if len(table) else float("nan")
    if anchors:
        stats.update(_anchor_statistics([a.name for a in anchors], table, pairs))
    stats["m_samples"] = float(m)
    stats["delta_th"] = float(cfg.delta_th)
    return PreferenceSet(table, pairs, stats)


def _anchor_statistics(names: Sequence[str], table: pd.DataFrame, pairs: pd.DataFrame) -> dict[str, float]:
    """How each anchor fared: its mean R beside the samples', and the share of paired prompts it won."""
    paired = table.loc[table["request_id"].isin(set(pairs["request_id"]))]
    winners = paired.loc[paired.groupby("request_id", sort=False)["reward"].idxmax(), "source"]
    stats = {}
    for name in names:
        written = table.loc[table["source"] == name, "reward"]
        stats[f"reward_{name}_mean"] = float(written.mean()) if len(written) else float("nan")
        stats[f"winner_{name}_share"] = float((winners == name).mean()) if len(winners) else 0.0
    return stats
