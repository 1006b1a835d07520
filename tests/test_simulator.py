import itertools

import numpy as np
import pandas as pd
import pytest

from llm_auction.baselines import make_baseline, spread_slots
from llm_auction.contracts import AdCandidate, AuctionRequest
from llm_auction.mechanism.grammar import parse_response, render_response, split_sentences
from llm_auction.simulator.base import UnknownEntityError, sample_clicks
from llm_auction.simulator.experiment import Environment, evaluate_policy
from llm_auction.simulator.oracle import oracle_layouts, oracle_metrics, oracle_rollouts, paired_differences
from llm_auction.simulator.references import make_reference
from llm_auction.text import bank
from llm_auction.text.organic import organic_answer
from llm_auction.text.reading import bridge_for, is_bridge


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
                bid=float(row["base_bid"]),
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


def _layouts(request: AuctionRequest, sentences: list[str], slots: list[list[int]]):
    """Every ordered set of up to 3 ads, each with or without its bridge, written out as text."""
    for n in range(1, 4):
        for order in itertools.permutations(range(len(request.ads)), n):
            for bridged in itertools.product((False, True), repeat=n):
                leads = {i: bridge_for(request.ads[i].text) for i, b in zip(order, bridged) if b}
                yield order, render_response(sentences, list(zip(slots[n], order)), leads)


def test_oracle_layout_matches_brute_force_on_the_written_text(env: Environment):
    cm = env.ground_truth
    rng = np.random.default_rng(0)
    bridged_any = False
    for request in env.world.auction_requests(limit=12):
        bids = np.asarray(request.bids)
        sentences = organic_answer(request.query, 3, rng)
        slots = [spread_slots(n, 3) for n in range(4)]
        best = cm.best_layout(request, bids, sentences, slots)
        brute = max(
            float(bids[list(order)] @ cm.expected_ctr(request, order, text))
            for order, text in _layouts(request, sentences, slots)
        )
        assert best.value == pytest.approx(brute)
        bridged_any |= any(best.bridged)
    assert bridged_any, "the oracle never bridges: the text terms do not matter"


def test_oracle_greedy_writes_the_layout_it_valued(env: Environment):
    cm = env.ground_truth
    oracle = make_reference("oracle_greedy", env.settings, cm)
    requests = env.world.auction_requests(limit=20)
    for request, text in zip(requests, oracle.allocate(requests, np.random.default_rng(1))):
        parsed = parse_response(text, len(request.ads), 3)
        sentences = [s for s in split_sentences(parsed.organic_text) if not is_bridge(s)]
        slots = [spread_slots(n, len(sentences)) for n in range(4)]
        best = cm.best_layout(request, np.asarray(request.bids), sentences, slots)
        assert parsed.allocation == best.order
        realised = float(
            np.asarray(request.bids)[list(parsed.allocation)]
            @ cm.expected_ctr(request, parsed.allocation, text)
        )
        assert realised == pytest.approx(best.value)


def test_candidate_pool_shrinks_beyond_the_layout_budget(env: Environment):
    request = env.world.auction_requests(limit=1)[0]
    bids = np.asarray(request.bids)
    sentences = organic_answer(request.query, 3, np.random.default_rng(0))
    slots = [spread_slots(n, 3) for n in range(4)]
    exact = env.ground_truth.best_layout(request, bids, sentences, slots)
    small = env.ground_truth.best_layout(request, bids, sentences, slots, max_layouts=50)
    assert 0 < small.value <= exact.value + 1e-12
    assert len(set(small.order)) == len(small.order) <= 3


# The text terms: nativeness, answer quality, flooding (a flights query; see the module docstring).

OPENER, TIP_1, TIP_2 = (
    "Good question about flights.",
    "First, book about six weeks ahead.",
    "Remember to pack a light bag.",
)


def _one_ad_ctr(env: Environment, request: AuctionRequest, text: str, index: int = 0) -> float:
    return float(env.ground_truth.expected_ctr(request, [index], text)[0])


def test_a_native_ad_gets_at_least_one_and_a_half_times_a_hard_ads_clicks(env: Environment):
    request = _request_with(env, ["travel"])
    bridge = bridge_for(request.ads[0].text)
    native = _one_ad_ctr(env, request, f"{OPENER} {TIP_1} {bridge} [AD 1] {TIP_2}")
    hard = _one_ad_ctr(env, request, f"{OPENER} {TIP_1} Remember to keep fees low. [AD 1] {TIP_2}")
    assert native / hard >= 1.5
    assert native / hard == pytest.approx(1 / env.settings.click_model.hard_ad_factor)


def test_context_of_the_category_is_partly_native_and_a_stacked_ad_is_hard(env: Environment):
    request = _request_with(env, ["travel", "travel"])
    cm = env.ground_truth
    topic = env.world.ads.set_index("ad_id").loc[request.ads[0].ad_id, "topic"]
    tips = {t.name: t.tips for c in bank.CATEGORIES for t in c.topics}
    other = next(t for t in ("flights", "hotels", "gear") if t != topic)
    own, sibling = f"Remember to {tips[topic][0]}.", f"Remember to {tips[other][0]}."
    native = _one_ad_ctr(env, request, f"{OPENER} {TIP_1} {own} [AD 1]")
    partial = _one_ad_ctr(env, request, f"{OPENER} {TIP_1} {sibling} [AD 1]")
    assert partial < native
    assert partial / native == pytest.approx((1 + env.settings.click_model.hard_ad_factor) / 2)
    spread = cm.expected_ctr(request, [0, 1], f"{OPENER} {TIP_1} {own} [AD 1] {own} [AD 2]")
    stacked = cm.expected_ctr(request, [0, 1], f"{OPENER} {TIP_1} {own} [AD 1] [AD 2] {own}")
    assert stacked[0] == pytest.approx(spread[0])
    assert stacked[1] < spread[1]


def test_an_answer_below_the_quality_floor_lowers_every_ads_clicks(env: Environment):
    request = _request_with(env, ["travel", "tech"])
    cm = env.ground_truth
    useful = cm.expected_ctr(request, [0, 1], f"{OPENER} [AD 1] {TIP_1} [AD 2] {TIP_2}")
    # the same units, but the answer repeats itself: one distinct useful sentence, below the floor of 2
    repeated = cm.expected_ctr(request, [0, 1], f"{OPENER} [AD 1] {OPENER} [AD 2] {OPENER}")
    penalty = 1 - env.settings.click_model.low_quality_penalty
    assert repeated == pytest.approx(useful * penalty)


def test_ads_and_ad_talk_flooding_the_answer_drive_clicks_to_zero(env: Environment):
    request = _request_with(env, ["travel", "tech", "home"])
    cm = env.ground_truth
    bridges = [bridge_for(ad.text) for ad in request.ads]
    light = cm.expected_ctr(request, [0], f"{OPENER} [AD 1] {TIP_1} {TIP_2}")[0]
    talk = cm.expected_ctr(request, [0], f"{OPENER} [AD 1] {bridges[1]} {bridges[2]} {TIP_2}")[0]
    flooded = cm.expected_ctr(request, [0, 1, 2], f"{OPENER} [AD 1] {bridges[1]} [AD 2] {bridges[2]} [AD 3]")
    ads_only = cm.expected_ctr(request, [0, 1, 2], "[AD 1] [AD 2] [AD 3]")
    assert talk < light
    assert (
        flooded[0]
        < 0.25 * cm.expected_ctr(request, [0, 1, 2], f"{OPENER} [AD 1] {TIP_1} [AD 2] {TIP_2} [AD 3]")[0]
    )
    assert np.all(ads_only == 0)


def test_the_oracles_page_terms_say_why_the_same_ad_earns_less(env: Environment):
    """`page_terms` (and `oracle_layouts`, their means per policy) are the terms `expected_ctr`
    multiplies: the same ad after the same sentence, with ad talk after it, earns their ratio."""
    request = _request_with(env, ["travel", "tech", "home"])
    cm = env.ground_truth
    bridges = [bridge_for(ad.text) for ad in request.ads]
    light_page = f"{OPENER} [AD 1] {TIP_1} {TIP_2}"
    talk_page = f"{OPENER} [AD 1] {bridges[1]} {bridges[2]} {TIP_2}"
    light, talk = (cm.page_terms(request, [0], page) for page in (light_page, talk_page))
    assert (light["useful"], light["talk"], light["bridges"]) == (3, 0, 0)
    assert (talk["useful"], talk["talk"], talk["bridges"]) == (2, 2, 2)
    assert light["nativeness"] == talk["nativeness"] and not talk["below_quality_floor"]
    ratio = cm.expected_ctr(request, [0], talk_page)[0] / cm.expected_ctr(request, [0], light_page)[0]
    assert ratio == pytest.approx(talk["answer_factor"] / light["answer_factor"]) and ratio < 1

    pages = pd.DataFrame(
        {"policy": ["light", "talk"], "request_id": ["t", "t"], "response": [light_page, talk_page]}
    )
    layouts = oracle_layouts(env, [request], pages)
    assert layouts["talk"] == {"ads": 1.0, **{k: pytest.approx(v, abs=1e-4) for k, v in talk.items()}}
    no_ads = cm.page_terms(request, [], OPENER)  # no ad: nothing for the page to multiply
    assert np.isnan(no_ads["nativeness"]) and np.isnan(no_ads["answer_factor"])


def test_paired_differences_compare_two_policies_request_by_request(env: Environment):
    """The learned auction against a baseline: per-request differences on the same requests (paired
    by request id, whatever the rows' order), whose mean is the difference of the two means."""
    requests = env.world.auction_requests(limit=80)
    rng = np.random.default_rng(0)
    written = {
        name: make_baseline(name, env.settings).allocate(requests, rng) for name in ("random", "no_ads")
    }
    ids = [r.request_id for r in requests]
    frames = [
        pd.DataFrame({"policy": name, "request_id": ids, "response": ys}) for name, ys in written.items()
    ]
    shuffled = frames[0].assign(policy="random again").sample(frac=1.0, random_state=1)
    responses = pd.concat([*frames, shuffled], ignore_index=True)
    rollouts = oracle_rollouts(env, requests, responses, 7)
    against = ("no_ads", "random again", "random", "x")
    paired = paired_differences(env, rollouts, 7, ("random", "absent"), against)
    assert set(paired) == {"random"} and set(paired["random"]) == {"no_ads", "random again"}  # not itself
    means = oracle_metrics(env, rollouts, 7)
    for metric in ("revenue", "social_welfare"):
        gain = paired["random"]["no_ads"][metric]
        assert gain.mean == pytest.approx(means["random"][metric].mean - means["no_ads"][metric].mean)
        same = paired["random"]["random again"][metric]
        assert same.mean == 0 and tuple(same.ci) == (0, 0)  # the same answers, paired by request
    assert paired["random"]["no_ads"]["revenue"].ci[0] > 0  # ads earn; no ads earn nothing


def test_user_utility_rewards_a_useful_uncrowded_answer(env: Environment):
    request = _request_with(env, ["travel"])
    cm = env.ground_truth
    full = cm.user_utility(request, f"{OPENER} {TIP_1} {TIP_2}", 0)
    assert full == pytest.approx(env.settings.click_model.user_weight)
    with_ad = cm.user_utility(request, f"{OPENER} {TIP_1} [AD 1] {TIP_2}", 1)
    thin = cm.user_utility(request, f"{OPENER} Remember to keep fees low.", 0)
    assert 0 < with_ad < full and 0 < thin < full
    assert cm.user_utility(request, "[AD 1]", 1) == 0


def test_welfare_is_advertisers_value_plus_the_users_utility(env: Environment):
    requests = env.world.auction_requests(limit=100)
    for name in ("no_ads", "random"):
        rollout, metrics = evaluate_policy(env, make_baseline(name, env.settings), requests, 0)
        ad_value = (rollout.impressions["value_per_click"] * rollout.impressions["expected_ctr"]).sum()
        user = rollout.requests["user_utility"].sum()
        assert user > 0
        assert metrics["social_welfare"].mean == pytest.approx((ad_value + user) / len(requests))
        assert metrics["social_welfare"].mean != pytest.approx(metrics["revenue"].mean)
