from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from llm_auction.baselines import make_baseline
from llm_auction.contracts import AdCandidate, Allocator, AuctionRequest, SampledAllocator
from llm_auction.mechanism.audits import audit_individual_rationality, audit_monotonicity
from llm_auction.mechanism.grammar import render_response
from llm_auction.mechanism.metrics import bootstrap
from llm_auction.mechanism.payments import expected_payments, payment_per_click
from llm_auction.reward.reward import impression_rows
from llm_auction.reward.scorer import bid_sum_scorer
from llm_auction.serving.auction import prediction
from llm_auction.simulator.experiment import Environment, evaluate_policy
from llm_auction.simulator.references import make_reference
from llm_auction.text.organic import organic_answer


def test_first_price_pays_the_bid_per_click():
    bids = np.array([1.5, 0.2])
    assert np.array_equal(payment_per_click(bids), bids)
    assert np.allclose(expected_payments(bids, np.array([0.1, 0.5])), [0.15, 0.1])


def test_bootstrap_interval_covers_the_truth_and_ratios():
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 1.0, 2000)
    est = bootstrap(x, None, 500, 0.95, rng)
    assert est.ci[0] < 2.0 < est.ci[1]
    assert est.ci[0] < est.mean < est.ci[1]
    assert est.ci[1] - est.ci[0] == pytest.approx(2 * 1.96 / np.sqrt(2000), rel=0.2)
    ratio = bootstrap(np.array([1.0, 0.0, 2.0]), np.array([2.0, 1.0, 2.0]), 200, 0.95, rng)
    assert ratio.mean == pytest.approx(3.0 / 5.0)
    assert np.isnan(bootstrap(np.zeros(3), np.zeros(3), 100, 0.95, rng).mean)


def test_bootstrap_refuses_non_finite_inputs_naming_where():
    rng = np.random.default_rng(0)
    with pytest.raises(
        ValueError, match=r"numerator has 2 non-finite value\(s\) of 4 \(first at positions \[1, 3\]"
    ):
        bootstrap(np.array([1.0, np.nan, 2.0, np.inf]), None, 100, 0.95, rng)
    with pytest.raises(
        ValueError, match=r"denominator has 1 non-finite value\(s\) of 3 \(first at positions \[2\]"
    ):
        bootstrap(np.ones(3), np.array([1.0, 2.0, -np.inf]), 100, 0.95, rng)
    with pytest.raises(ValueError, match="denominator shape"):
        bootstrap(np.ones(3), np.ones(2), 100, 0.95, rng)


def test_bootstrap_ratio_reports_resamples_without_a_denominator():
    """A ratio over few ads: resamples whose denominator sums to 0 are undefined, counted, and left out;
    past `max_undefined_share` of them the interval is NaN rather than biased."""
    clicks, ads = np.array([1.0, 0.0, 0.0, 0.0]), np.array([2.0, 0.0, 0.0, 0.0])
    sparse = bootstrap(clicks, ads, 2000, 0.95, np.random.default_rng(0))
    # P(no request with ads among 4 draws) = (3/4)^4 ~ 0.32
    assert sparse.mean == pytest.approx(0.5)
    assert sparse.undefined_share == pytest.approx(0.75**4, abs=0.03)
    assert np.isnan(sparse.ci[0]) and np.isnan(sparse.ci[1])
    tolerant = bootstrap(clicks, ads, 2000, 0.95, np.random.default_rng(0), max_undefined_share=0.5)
    assert tolerant.ci == (0.5, 0.5)  # every defined resample is 1 click per 2 ads
    dense = bootstrap(
        np.array([1.0, 0.0, 2.0]), np.array([2.0, 1.0, 2.0]), 500, 0.95, np.random.default_rng(0)
    )
    assert dense.undefined_share == 0.0 and np.isfinite(dense.ci).all()
    assert dense.to_dict().keys() == {"mean", "ci"}  # the serialised form is unchanged


@dataclass
class LowestBidsWin:
    """Deliberately non-monotone: the cheapest advertisers get the ads."""

    name: str = "lowest_bids"

    def allocate(self, requests: list[AuctionRequest], rng: np.random.Generator) -> list[str]:
        return [
            render_response(
                organic_answer(r.query, 3, rng), [(1, int(i)) for i in np.argsort(r.bids, kind="stable")[:2]]
            )
            for r in requests
        ]


def test_monotonicity_audit_passes_pre_generation_and_flags_a_non_monotone_rule(env: Environment):
    requests = env.world.auction_requests(limit=25)
    factors = env.settings.mechanism.monotonicity_factors
    pre = make_reference("pre_generation@oracle", env.settings, env.ground_truth)
    report = audit_monotonicity(pre, requests, env.ground_truth, factors, max_ads=3)
    assert report.n_checks == 25 * len(requests[0].ads) * (len(factors) - 1)
    assert report.violations == []
    assert report.bid_doubling.ci[0] > 0  # bids drive a bid-ranked auction
    assert report.detectable_drop == 1e-9  # deterministic: every fall is seen
    bad = audit_monotonicity(LowestBidsWin(), requests, env.ground_truth, factors)
    assert len(bad.violations) > 0 and bad.bid_doubling.ci[1] < 0
    v = bad.violations[0]
    assert v.clicks[1] < v.clicks[0] and v.factors[0] < v.factors[1]


def test_monotonicity_audit_handles_sampled_rules(env: Environment):
    requests = env.world.auction_requests(limit=10)
    factors = env.settings.mechanism.monotonicity_factors
    random_rule = make_baseline("random", env.settings)
    report = audit_monotonicity(random_rule, requests, env.ground_truth, factors, n_samples=8, seed=1)
    assert report.violations == []  # bid-blind: common random numbers give equal clicks at every level
    assert report.bid_doubling.mean == 0.0 and report.bid_doubling.ci == (0.0, 0.0)
    assert 0 < report.detectable_drop < 1  # 8 samples per level: only a large enough fall is seen
    finer = audit_monotonicity(random_rule, requests, env.ground_truth, factors, n_samples=64, seed=1)
    assert finer.detectable_drop < report.detectable_drop
    oracle = make_reference("oracle_greedy", env.settings, env.ground_truth)
    assert audit_monotonicity(oracle, requests, env.ground_truth, factors, n_samples=2).violations == []


@dataclass
class BatchSampler:
    """A rule that also samples many requests in one batch, each from its own seed (as the LLM policy)."""

    rule: Allocator
    name: str = "batch_sampler"
    batches: int = 0
    cases: int = 0

    def allocate(self, requests: list[AuctionRequest], rng: np.random.Generator) -> list[str]:
        return self.rule.allocate(requests, rng)

    def sample(self, requests: list[AuctionRequest], n: int, seeds: list[int]) -> list[list[str]]:
        self.batches += 1
        self.cases += len(requests)
        return [self.rule.allocate([r] * n, np.random.default_rng(s)) for r, s in zip(requests, seeds)]


def test_the_audit_samples_a_batch_sampler_once_and_keeps_common_random_numbers(env: Environment):
    requests = env.world.auction_requests(limit=10)
    factors = env.settings.mechanism.monotonicity_factors
    blind = BatchSampler(make_baseline("random", env.settings))
    assert isinstance(blind, SampledAllocator) and not isinstance(LowestBidsWin(), SampledAllocator)
    report = audit_monotonicity(blind, requests, env.ground_truth, factors, n_samples=8, seed=1)
    assert blind.batches == 1 and report.n_checks == 10 * len(requests[0].ads) * (len(factors) - 1)
    assert blind.cases == 10 * (len(requests[0].ads) * (len(factors) - 1) + 1)  # bids as they came: once
    assert report.violations == []  # every bid level of a candidate drew the same responses
    cheapest = BatchSampler(LowestBidsWin())
    assert audit_monotonicity(cheapest, requests, env.ground_truth, factors, n_samples=2).violations
    assert cheapest.batches == 1


def test_individual_rationality_holds_for_truthful_first_price(env: Environment):
    requests = env.world.auction_requests(limit=200)
    rollout, _ = evaluate_policy(
        env, make_reference("pre_generation@oracle", env.settings, env.ground_truth), requests, 0
    )
    report = audit_individual_rationality(rollout.impressions)
    assert report.holds
    assert report.n_truthful_advertisers > 0
    assert report.min_truthful_utility == pytest.approx(0.0)
    overcharge = rollout.impressions["bid"].to_numpy() * 1.1
    flagged = audit_individual_rationality(rollout.impressions, payment_per_click=overcharge)
    assert not flagged.holds
    assert flagged.n_overcharged == len(rollout.impressions)
    assert flagged.n_truthful_negative_utility > 0


def test_ir_audit_exempts_overbidders():
    impressions = pd.DataFrame(
        {
            "advertiser_id": ["a", "b"],
            "bid": [2.0, 1.0],
            "value_per_click": [1.0, 1.5],
            "expected_ctr": [0.2, 0.2],
        }
    )
    report = audit_individual_rationality(impressions)
    assert report.holds  # a loses money only because it bid above its value
    assert report.n_truthful_advertisers == 1
    assert report.min_truthful_utility == pytest.approx(0.1)


def test_a_request_that_allows_no_ads_gets_none_from_every_reader():
    """`max_ads: 0` is the request's own limit, not "unset": every parse of its response (psi's
    rows, the bid-sum reward, the served prediction) inserts nothing."""
    ads = (AdCandidate(ad_id="a1", advertiser_id="v1", text="Shoes.", bid=2.0),)
    request = AuctionRequest(request_id="r", user_id="u", query="shoes?", ads=ads, max_ads=0)
    response = "Try these. [AD 1]"
    assert request.ad_limit(3) == 0 and request.model_copy(update={"max_ads": None}).ad_limit(3) == 3
    assert bid_sum_scorer([request], [response], max_ads=3).tolist() == [0.0]
    rows, errors = impression_rows([request], [response], max_ads=3)
    assert rows.empty and errors.tolist() == [1]
    served = prediction(
        request,
        response,
        response_id="y",
        policy_version="1",
        served_at=datetime.now(UTC),
        max_ads=3,
        pctr=None,
    )
    assert served["allocation"] == []
