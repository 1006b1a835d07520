"""The ranking stage in front of the policy: the listed order, and markers back in the request's."""

from __future__ import annotations

import numpy as np

from llm_auction.contracts import AdCandidate, AuctionRequest
from llm_auction.mechanism.grammar import parse_response
from llm_auction.mechanism.ranking import ecpm_order, listed, restore_markers, to_listed_markers
from llm_auction.policy.allocator import rank_requests


def _request(bids: list[float]) -> AuctionRequest:
    ads = [
        AdCandidate(ad_id=f"a{i}", advertiser_id=f"v{i}", text=f"ad {i}", bid=b) for i, b in enumerate(bids)
    ]
    return AuctionRequest(request_id="r", user_id="u", query="q", ads=tuple(ads))


def test_ecpm_lists_by_bid_times_pctr_and_keeps_ties_in_request_order():
    assert ecpm_order([1.0, 2.0, 0.5, 1.0], [0.2, 0.05, 0.4, 0.2]) == (0, 2, 3, 1)
    request = _request([1.0, 2.0, 0.5, 1.0])
    shown = listed(request, (0, 2, 3, 1))
    assert [ad.ad_id for ad in shown.ads] == ["a0", "a2", "a3", "a1"]
    assert [ad.bid for ad in shown.ads] == [1.0, 0.5, 1.0, 2.0]  # each bid moves with its ad


def test_markers_go_back_to_the_request_order_and_there_again():
    order = (2, 0, 1)  # listed [AD 1] is the request's third candidate
    written = "Tips. [AD 1] More. [AD 3] [AD 9] [ AD 2 ]"
    restored = restore_markers(written, order)
    assert restored == "Tips. [AD 3] More. [AD 2] [AD 9] [ AD 2 ]"  # errors stay errors
    assert to_listed_markers(restored, order) == written
    assert parse_response(restored, 3).allocation == (2, 1)  # the listed choice, in request indices
    assert parse_response(restored, 3).errors == parse_response(written, 3).errors


def test_a_raised_bid_moves_its_ad_up_the_list():
    request = _request([1.0, 0.8, 0.6])
    pctr = [np.array([0.1, 0.1, 0.1])]
    assert rank_requests([request], lambda rs: pctr)[1] == [(0, 1, 2)]
    raised = request.with_bid(2, 1.2)
    (shown,), (order,) = rank_requests([raised], lambda rs: pctr)
    assert order == (2, 0, 1) and shown.ads[0].ad_id == "a2"
    assert rank_requests([raised], None) == ([raised], [(0, 1, 2)])  # no ranker: as given


def test_the_server_ranks_concurrent_requests_in_psis_batches_as_the_policy_does(env):
    """The server's ranking stage scores each candidate alone under the champion's psi, in psi's
    micro-batches: concurrent requests share a scoring call, and each gets the order
    `rank_requests` gives with `standalone_pctr` (the rule offline evaluation and IRPO list by)."""
    import asyncio

    from conftest import untrained_scorer
    from llm_auction.config import GenerationConfig
    from llm_auction.serving.server import Arms, AuctionModel, ServedPolicy
    from llm_auction.simulator.experiment import split_requests

    scorer = untrained_scorer(env)
    requests = split_requests(env, limit_train=False)[1][:24]
    served = ServedPolicy("1", None, None, 512, GenerationConfig(), scorer, "1")

    def ranked_by(ranking: str):
        policy = env.settings.policy.model_copy(update={"ranking": ranking})
        return AuctionModel(env.settings.model_copy(update={"policy": policy}))

    model = ranked_by("ecpm")
    model.arms = Arms(served)

    async def rank_each() -> list:
        return await asyncio.gather(*(model._rank([r], served) for r in requests))

    try:
        ranked = asyncio.run(rank_each())
    finally:
        model.stop()
    expected_shown, expected_orders = rank_requests(requests, scorer.standalone_pctr)
    assert [order for _, (order,) in ranked] == expected_orders
    assert [shown for (shown,), _ in ranked] == expected_shown
    assert any(o != tuple(range(len(o))) for o in expected_orders)  # psi moved some ads
    assert sum(model.psi.batch_sizes) == sum(len(r.ads) for r in requests)
    assert len(model.psi.batch_sizes) < len(requests)  # shared calls, not one per request
    as_listed = ranked_by("as_listed")
    try:
        assert asyncio.run(as_listed._rank(requests, served)) == rank_requests(requests, None)
    finally:
        as_listed.stop()
