"""The oracle section of evaluation (simulation only): the true expected clicks of given responses.

Production evaluates with psi_t (`evaluation.candidate`) and keeps every policy's responses; here
the simulator's click model scores exactly those responses on the same held-out requests, and
prices the upper references (`simulator.references`) that only the truth can build. Nothing a
platform could run reads this.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llm_auction.contracts import AuctionRequest
from llm_auction.mechanism.grammar import parse_response
from llm_auction.mechanism.metrics import Estimate, auction_metrics, bootstrap, per_request_outcomes
from llm_auction.simulator.experiment import Environment, evaluate_policy
from llm_auction.simulator.references import ORACLE_REFERENCES, make_reference
from llm_auction.simulator.rollout import Rollout, rollout

ORACLE_LABEL = "oracle (simulation only): expected clicks under the simulator's click model"


@dataclass
class Replay:
    """An `Allocator` that answers each request with a response written earlier (by request id)."""

    responses: Mapping[str, str]
    name: str = "replay"

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]:
        return [self.responses[r.request_id] for r in requests]


def oracle_rollouts(
    env: Environment, requests: Sequence[AuctionRequest], responses: pd.DataFrame, seed: int
) -> dict[str, Rollout]:
    """Each policy's responses (`policy`, `request_id`, `response` rows) read by the simulated users."""
    return {
        str(policy): rollout(
            Replay(dict(zip(frame["request_id"], frame["response"])), str(policy)),
            requests,
            env.click_model,
            env.value_of,
            np.random.default_rng([seed, 1]),
            env.settings.mechanism.max_ads,
            user_utility=env.ground_truth.user_utility,
        )
        for policy, frame in responses.groupby("policy", sort=False)
    }


def oracle_metrics(
    env: Environment, rollouts: Mapping[str, Rollout], seed: int
) -> dict[str, dict[str, Estimate]]:
    """Oracle metrics of each policy's rollout (`oracle_rollouts`)."""
    m = env.settings.mechanism
    return {
        policy: auction_metrics(
            result.requests,
            result.impressions,
            m.bootstrap_samples,
            m.ci_level,
            np.random.default_rng([seed, 2]),
        )
        for policy, result in rollouts.items()
    }


PAIRED_METRICS = {"revenue": "payment", "social_welfare": "welfare"}
"""The metrics compared request by request, and their column in `per_request_outcomes`."""


def paired_differences(
    env: Environment,
    rollouts: Mapping[str, Rollout],
    seed: int,
    policies: Sequence[str],
    against: Sequence[str],
) -> dict[str, dict[str, dict[str, Estimate]]]:
    """`{policy: {baseline: {metric: Estimate}}}`: the per-request difference policy minus baseline
    on the same requests, bootstrapped (issue 16's test: does the learned auction beat the deployable
    ones, paired, not by two overlapping intervals). Only the policies and baselines present; a
    policy is not paired with itself.
    """
    m = env.settings.mechanism
    outcomes = {
        name: per_request_outcomes(r.requests, r.impressions, "expected_ctr") for name, r in rollouts.items()
    }
    out: dict[str, dict[str, dict[str, Estimate]]] = {}
    for policy in (p for p in policies if p in outcomes):
        for baseline in (b for b in against if b in outcomes and b != policy):
            paired = outcomes[policy].join(outcomes[baseline], rsuffix="_baseline", how="inner")
            out.setdefault(policy, {})[baseline] = {
                metric: bootstrap(
                    (paired[column] - paired[f"{column}_baseline"]).to_numpy(),
                    None,
                    m.bootstrap_samples,
                    m.ci_level,
                    np.random.default_rng([seed, 4]),
                )
                for metric, column in PAIRED_METRICS.items()
            }
    return out


def oracle_layouts(
    env: Environment, requests: Sequence[AuctionRequest], responses: pd.DataFrame
) -> dict[str, dict[str, float]]:
    """How the oracle's reader takes each policy's pages (`policy`, `request_id`, `response` rows):
    per response, the means of the click model's `page_terms` and the ads inserted. Two policies
    that insert the same ads earn differently by these (issue 16's diagnostic: a policy's own text
    against the organic answer post-generation inserts into). Empty for a click model without them
    (the LLM judge).
    """
    page_terms = getattr(env.click_model, "page_terms", None)
    if page_terms is None:
        return {}
    by_id = {r.request_id: r for r in requests}
    max_ads = env.settings.mechanism.max_ads
    out = {}
    for policy, frame in responses.groupby("policy", sort=False):
        rows = []
        for request_id, response in zip(frame["request_id"], frame["response"]):
            request = by_id[request_id]
            allocation = parse_response(response, len(request.ads), request.ad_limit(max_ads)).allocation
            rows.append({"ads": float(len(allocation)), **page_terms(request, allocation, response)})
        means = pd.DataFrame(rows).mean()  # nativeness and the answer factor over pages with ads
        out[str(policy)] = {k: None if pd.isna(v) else round(float(v), 4) for k, v in means.items()}
    return out


def references(
    env: Environment, requests: Sequence[AuctionRequest], seed: int, names: Sequence[str] = ORACLE_REFERENCES
) -> dict[str, dict[str, Estimate]]:
    """Oracle metrics of the upper references on the same requests (they do not train: once per run)."""
    return {
        name: evaluate_policy(env, make_reference(name, env.settings, env.ground_truth), requests, seed)[1]
        for name in names
    }


@dataclass(frozen=True)
class Headroom:
    """How far an oracle reference is above the best deployable rule on one metric."""

    metric: str
    best: str
    """The deployable rule with the highest mean on this metric."""
    ratio: Estimate
    """oracle / best over the same requests (paired bootstrap: both resampled together)."""


def headroom(
    oracle: Rollout, deployable: Mapping[str, Rollout], n_boot: int, level: float, seed: int
) -> list[Headroom]:
    """The oracle's revenue and welfare over the best deployable rule's, on the same requests.

    What a learned auction could still gain over today's decoupled ones, if it wrote as well as
    the truth allows; a ratio near 1 leaves it nothing to learn.
    """
    out = []
    outcomes = {
        name: per_request_outcomes(r.requests, r.impressions, "expected_ctr")
        for name, r in deployable.items()
    }
    top = per_request_outcomes(oracle.requests, oracle.impressions, "expected_ctr")
    for metric, column in PAIRED_METRICS.items():
        best = max(outcomes, key=lambda name: outcomes[name][column].mean())
        paired = top[[column]].join(outcomes[best][[column]], rsuffix="_best")
        ratio = bootstrap(
            paired[column].to_numpy(),
            paired[f"{column}_best"].to_numpy(),
            n_boot,
            level,
            np.random.default_rng([seed, 3]),
        )
        out.append(Headroom(metric, best, ratio))
    return out
