import itertools

import numpy as np
import pytest

from llm_auction.contracts import AdCandidate, AuctionRequest
from llm_auction.simulator.base import UnknownEntityError, sample_clicks
from llm_auction.simulator.experiment import Environment


def _request_with(env: Environment, categories: list[str], topic_of_query: bool = True) -> AuctionRequest:
    """A request whose query is about travel/flights, with one world ad per asked category."""
    world = env.world
    query = world.queries[world.queries["topic"] == "flights"]["text"].iat[0]
    ads = []
    used: set[str] = set()
    for category in categories:
        row = world.ads[(world.ads["category"] == category) & ~world.ads["ad_id"].isin(used)].iloc[0]
        used.add(row["ad_id"])
        ads.append(
            AdCandidate(
                ad_id=row["ad_id"],
                advertiser_id=row["advertiser_id"],
                text=row["text"],
                bid=float(row["bid"]),
            )
        )
    return AuctionRequest(request_id="t", user_id=world.users["user_id"].iat[0], query=query, ads=tuple(ads))


def test_ctr_falls_with_position(env: Environment):
    request = _request_with(env, ["travel", "tech", "home"])
    cm = env.ground_truth
    for ad in range(3):
        ctr_by_position = []
        for position in range(3):
            others = [i for i in range(3) if i != ad]
            allocation = others[:position] + [ad] + others[position:]
            ctr_by_position.append(cm.expected_ctr(request, allocation)[position])
        assert ctr_by_position[0] > ctr_by_position[1] > ctr_by_position[2]


def test_same_category_ad_lowers_others_more_than_another_category(env: Environment):
    request = _request_with(env, ["travel", "travel", "tech"])
    cm = env.ground_truth
    alone = cm.expected_ctr(request, [0])[0]
    with_same = cm.expected_ctr(request, [0, 1])[0]
    with_other = cm.expected_ctr(request, [0, 2])[0]
    assert with_same < alone
    assert with_same < with_other


def test_ad_load_fatigue(env: Environment):
    request = _request_with(env, ["travel", "tech", "home", "finance"])
    cm = env.ground_truth
    ctr_first = [cm.expected_ctr(request, list(range(n)))[0] for n in range(1, 5)]
    assert all(a > b for a, b in itertools.pairwise(ctr_first))


def test_relevance_and_interest_raise_ctr(env: Environment):
    request = _request_with(env, ["travel", "education"])
    standalone = env.ground_truth.standalone_ctr(request)
    assert standalone.shape == (2,)
    assert np.all((standalone > 0) & (standalone < 1))
    # the travel ad is on the query's category: more relevant than an education ad for most users
    world = env.world
    better = 0
    for user in world.users["user_id"][:50]:
        s = env.ground_truth.standalone_ctr(request.model_copy(update={"user_id": user}))
        better += s[0] > s[1]
    assert better > 25


def test_empty_allocation_and_unknown_entities(env: Environment):
    request = _request_with(env, ["travel"])
    assert env.ground_truth.expected_ctr(request, []).shape == (0,)
    with pytest.raises(UnknownEntityError, match="user_id"):
        env.ground_truth.expected_ctr(request.model_copy(update={"user_id": "nobody"}), [0])
    with pytest.raises(UnknownEntityError, match="query"):
        env.ground_truth.expected_ctr(request.model_copy(update={"query": "what is love"}), [0])


def test_clicks_are_seeded_bernoulli_draws():
    ctr = np.array([0.1, 0.5, 0.9])
    first = [sample_clicks(ctr, np.random.default_rng(s)) for s in range(20)]
    again = [sample_clicks(ctr, np.random.default_rng(s)) for s in range(20)]
    assert all((a == b).all() for a, b in zip(first, again))
    assert len({tuple(a) for a in first}) > 1
    rng = np.random.default_rng(0)
    draws = np.array([sample_clicks(ctr, rng) for _ in range(4000)])
    assert np.allclose(draws.mean(axis=0), ctr, atol=0.03)


def test_best_allocation_matches_brute_force(env: Environment):
    cm = env.ground_truth
    for request in env.world.auction_requests(limit=15):
        bids = np.asarray(request.bids)
        best, value = cm.best_allocation(request, bids, max_ads=3)
        brute = max(
            (float(bids[list(p)] @ cm.expected_ctr(request, p)), p)
            for n in range(0, 4)
            for p in itertools.permutations(range(len(request.ads)), n)
        )
        assert value == pytest.approx(brute[0])
        assert float(bids[list(best)] @ cm.expected_ctr(request, best)) == pytest.approx(brute[0])


def test_greedy_search_is_used_beyond_the_subset_budget(env: Environment):
    request = env.world.auction_requests(limit=1)[0]
    bids = np.asarray(request.bids)
    exact, exact_value = env.ground_truth.best_allocation(request, bids, max_ads=3)
    greedy, greedy_value = env.ground_truth.best_allocation(request, bids, max_ads=3, max_subsets=1)
    assert 0 < greedy_value <= exact_value + 1e-12
    assert len(set(greedy)) == len(greedy) <= 3
