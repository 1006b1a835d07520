import numpy as np
import pytest

from llm_auction.baselines import BASELINES, make_baseline
from llm_auction.mechanism.grammar import parse_response
from llm_auction.simulator.experiment import Environment, evaluate_policy


@pytest.fixture(scope="module")
def outcomes(env: Environment):
    requests = env.world.auction_requests(limit=300)
    results = {}
    for name in BASELINES:
        rollout, metrics = evaluate_policy(
            env, make_baseline(name, env.settings, env.ground_truth), requests, seed=3
        )
        results[name] = (rollout, metrics)
    return results


def _revenue_by_request(rollout) -> np.ndarray:
    imp = rollout.impressions.assign(revenue=rollout.impressions["bid"] * rollout.impressions["expected_ctr"])
    per = imp.groupby("request_id")["revenue"].sum()
    return rollout.requests["request_id"].map(per).fillna(0.0).to_numpy()


def test_oracle_greedy_beats_every_baseline_on_every_request(outcomes):
    oracle = _revenue_by_request(outcomes["oracle_greedy"][0])
    for name in BASELINES:
        assert np.all(oracle >= _revenue_by_request(outcomes[name][0]) - 1e-12), name
    assert outcomes["oracle_greedy"][1]["revenue"].mean > outcomes["pre_generation"][1]["revenue"].mean


def test_no_ads_gives_zero(outcomes):
    rollout, metrics = outcomes["no_ads"]
    assert rollout.impressions.empty
    assert metrics["revenue"].mean == 0.0 and metrics["ad_load"].mean == 0.0
    assert np.isnan(metrics["itctr"].mean)


def test_baselines_write_well_formed_responses_within_limits(outcomes, env: Environment):
    max_ads = env.settings.mechanism.max_ads
    for name, (rollout, metrics) in outcomes.items():
        assert metrics["format_error_rate"].mean == 0.0, name
        assert rollout.requests["n_ads"].le(max_ads).all(), name
    assert (
        outcomes["post_generation"][0]
        .requests["n_ads"]
        .eq(env.settings.baselines.post_generation_slots)
        .all()
    )
    assert outcomes["pre_generation"][0].requests["n_ads"].eq(max_ads).all()


def test_request_max_ads_is_respected(env: Environment):
    request = env.world.auction_requests(limit=1)[0].model_copy(update={"max_ads": 1})
    for name in BASELINES:
        response = make_baseline(name, env.settings, env.ground_truth).allocate(
            [request], np.random.default_rng(0)
        )[0]
        assert len(parse_response(response, len(request.ads)).allocation) <= 1, name


def test_pre_generation_ranks_by_bid_times_ctr(env: Environment):
    request = env.world.auction_requests(limit=1)[0]
    response = make_baseline("pre_generation", env.settings, env.ground_truth).allocate(
        [request], np.random.default_rng(0)
    )[0]
    score = np.asarray(request.bids) * env.ground_truth.standalone_ctr(request)
    expected = tuple(int(i) for i in np.argsort(-score)[: env.settings.mechanism.max_ads])
    assert parse_response(response, len(request.ads)).allocation == expected


def test_unknown_baseline_names_the_field(env: Environment):
    with pytest.raises(ValueError, match="policy: unknown baseline 'best'"):
        make_baseline("best", env.settings, env.ground_truth)
