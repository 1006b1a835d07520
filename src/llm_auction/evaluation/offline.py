"""Offline evaluation on held-out requests: the reward model's estimate beside the simulator's oracle.

Production has only the reward model: R of the sampled responses under psi (`reward`). The
simulator adds what production cannot see, the expected-click metrics under the true click model.
Both are bootstrapped over requests, on the same requests and the same samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm_auction.contracts import Allocator, AuctionRequest
from llm_auction.irpo.sampling import Scorer
from llm_auction.mechanism.metrics import Estimate, bootstrap
from llm_auction.simulator.experiment import Environment, evaluate_policy
from llm_auction.simulator.rollout import Rollout


def evaluate_allocator(
    env: Environment,
    allocator: Allocator,
    requests: Sequence[AuctionRequest],
    seed: int,
    scorer: Scorer | None = None,
) -> tuple[Rollout, dict[str, Estimate]]:
    """Oracle metrics of one sampled response per request, plus `reward` (R under psi) when scored.

    With a scorer, each request's R is also kept in the rollout's request table (`reward`), so a
    paired comparison needs no second scoring pass.
    """
    result, metrics = evaluate_policy(env, allocator, requests, seed)
    if scorer is not None:
        rewards = scorer(requests, result.requests["response"].tolist())
        result.requests["reward"] = rewards
        m = env.settings.mechanism
        metrics["reward"] = bootstrap(
            rewards, None, m.bootstrap_samples, m.ci_level, np.random.default_rng([seed, 3])
        )
    return result, metrics
