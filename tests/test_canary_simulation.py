"""The canary's decision with real policies in the simulated world: the truly better arm wins.

pi_0 (the tiny LLM the project trains) and `oracle_greedy` (the simulator's revenue-maximising
reference, priced with the truth) answer the users the server's hash gives them; the simulated
users click; the logs are the collector's public schemas; the verdict reads only those logs.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from llm_auction.config import CanaryConfig
from llm_auction.evaluation.canary import CHALLENGER, CHAMPION, canary_outcomes, decide, first_verdict
from llm_auction.policy.allocator import LLMPolicy
from llm_auction.policy.generation import make_generator
from llm_auction.public.feedback import request_rows
from llm_auction.serving.split import arm_for
from llm_auction.simulator.experiment import Environment, user_profiles
from llm_auction.simulator.feedback import feedback_logs
from llm_auction.simulator.references import make_reference
from llm_auction.simulator.rollout import rollout

pytestmark = pytest.mark.slow

N_REQUESTS = 1200
T0 = pd.Timestamp("2026-12-01", tz="UTC")


@pytest.fixture(scope="module")
def policies(pi0, policy_env: Environment):
    settings = policy_env.settings
    pi_0 = LLMPolicy(
        make_generator(settings.policy.generation, pi0[0]), user_profiles(policy_env.world), "pi_0"
    )
    return {"pi_0": pi_0, "oracle_greedy": make_reference("oracle_greedy", settings, policy_env.ground_truth)}


def canary_logs(env: Environment, arms: dict[str, tuple[str, object]], seed: int = 0):
    """Live traffic of a 50% canary: each request answered by its user's arm, then clicked."""
    requests = env.world.auction_requests(limit=N_REQUESTS)
    at = {r.request_id: T0 + pd.Timedelta(seconds=i) for i, r in enumerate(requests)}
    arm_of = [arm_for(r.user_id, 50, salt="2") for r in requests]
    impressions, clicks = [], []
    for arm, (version, allocator) in arms.items():
        mine = [r for r, a in zip(requests, arm_of, strict=True) if a == arm]
        rng = np.random.default_rng([seed, len(version)])
        result = rollout(allocator, mine, env.click_model, env.value_of, rng, env.settings.mechanism.max_ads)
        shown, clicked = feedback_logs(result, mine, pd.Series(at), version, rng)
        impressions.append(shown), clicks.append(clicked)
    versions = [arms[a][0] for a in arm_of]
    log = request_rows(requests, [at[r.request_id] for r in requests], arm_of, versions)
    return canary_outcomes(log, pd.concat(impressions), pd.concat(clicks))


CFG = CanaryConfig(min_requests_per_arm=200, max_requests=N_REQUESTS)


@pytest.mark.parametrize(
    ("champion", "challenger", "expected"),
    [("pi_0", "oracle_greedy", "promote"), ("oracle_greedy", "pi_0", "rollback")],
)
def test_the_truly_better_policy_wins_the_canary(policies, policy_env, champion, challenger, expected):
    outcomes = canary_logs(
        policy_env, {CHAMPION: (champion, policies[champion]), CHALLENGER: (challenger, policies[challenger])}
    )
    margin = policy_env.settings.gate.itctr_margin
    decision = decide(outcomes, CFG, margin, n_boot=200, final=True)
    assert decision.decision == expected, decision.reason
    verdict, used = first_verdict(outcomes, CFG, margin, look_every=100)  # as the step would look
    assert verdict == expected and used < N_REQUESTS
    arms = decision.arms
    assert arms[CHAMPION].policy_versions == [champion] and arms[CHALLENGER].policy_versions == [challenger]
    assert abs(arms[CHALLENGER].requests / N_REQUESTS - 0.5) < 0.1
