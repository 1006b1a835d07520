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
