"""Dynamic batching and the predict contract, without a server."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_auction.config import ServingConfig
from llm_auction.contracts import AdCandidate, AuctionRequest
from llm_auction.serving.auction import AuctionInputError, parse_instances, prediction
from llm_auction.serving.batcher import MicroBatcher


def _slow_square(items: list[int]) -> list[int]:
    time.sleep(0.02)  # a model call: costly per call, cheap per item
    return [i * i for i in items]


async def _gather(batcher: MicroBatcher, groups: list[list[int]]) -> list[list[int]]:
    try:
        return await asyncio.gather(*(batcher.submit(g) for g in groups))
    finally:
        batcher.close()


def test_concurrent_requests_share_model_calls_and_get_their_own_results():
    batcher = MicroBatcher(_slow_square, max_batch_size=8, max_latency_s=0.05)
    groups = [[i] for i in range(20)] + [[100, 101, 102]]
    results = asyncio.run(_gather(batcher, groups))
    assert results == [[i * i for i in g] for g in groups]
    assert sum(batcher.batch_sizes) == 23
    assert max(batcher.batch_sizes) <= 8 and len(batcher.batch_sizes) < len(groups)


def test_without_batching_every_request_is_its_own_call():
    batcher = MicroBatcher(_slow_square, max_batch_size=8, enabled=False)
    results = asyncio.run(_gather(batcher, [[i] for i in range(6)]))
    assert results == [[i * i] for i in range(6)] and list(batcher.batch_sizes) == [1] * 6


def test_a_request_larger_than_the_batch_is_never_split_and_order_is_kept():
    batcher = MicroBatcher(_slow_square, max_batch_size=4, max_latency_s=0.05)
    groups = [[1, 2, 3], [4, 5], [6, 7, 8, 9, 10], [11]]
    assert asyncio.run(_gather(batcher, groups)) == [[i * i for i in g] for g in groups]
    assert 5 in batcher.batch_sizes  # the big one ran alone, whole


def test_a_failing_batch_fails_its_waiters_and_the_next_batch_runs():
    calls = []

    def flaky(items: list[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            raise RuntimeError("model fell over")
        return items

    async def scenario() -> tuple[list, list[int]]:
        batcher = MicroBatcher(flaky, max_batch_size=8, max_latency_s=0.05)
        try:
            first = await asyncio.gather(batcher.submit([1]), batcher.submit([2]), return_exceptions=True)
            return first, await batcher.submit([3])
        finally:
            batcher.close()

    first, after = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) for r in first) and after == [3]


def test_batches_never_overlap_on_the_model_thread():
    active, overlaps = [0], [0]
    lock = threading.Lock()

    def guarded(items: list[int]) -> list[int]:
        with lock:
            active[0] += 1
            overlaps[0] = max(overlaps[0], active[0])
        time.sleep(0.01)
        with lock:
            active[0] -= 1
        return items

    for enabled in (True, False):
        batcher = MicroBatcher(guarded, max_batch_size=2, max_latency_s=0.001, enabled=enabled)
        asyncio.run(_gather(batcher, [[i] for i in range(10)]))
    assert overlaps[0] == 1


def _request(n_ads: int = 3, **changes) -> dict:
    ads = [
        {"ad_id": f"a{i}", "advertiser_id": f"v{i}", "text": f"ad {i}", "bid": 1.0 + i} for i in range(n_ads)
    ]
    return {"request_id": "r1", "user_id": "u1", "query": "running shoes", "ads": ads, **changes}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("not a dict", "body"),
        ({"instances": "x"}, "instances"),
        ({"instances": [_request(max_ads=-1)]}, "instances.0.max_ads"),
        ({"instances": [_request(), _request(query="")]}, "instances.1.query"),
        ({"instances": [_request(n_ads=17)]}, "instances.0.ads"),
        (
            {"instances": [{**_request(), "ads": [{**_request()["ads"][0], "bid": 5000.0}]}]},
            "instances.0.ads.0.bid",
        ),
    ],
)
def test_a_bad_payload_names_the_field(body, field):
    with pytest.raises(AuctionInputError, match=field.replace(".", r"\.")):
        parse_instances(body, ServingConfig(), max_bid=1000.0)


@settings(max_examples=60, deadline=None)
@given(
    bids=st.lists(st.floats(0.01, 999.0), min_size=1, max_size=6),
    order=st.permutations(range(6)),
    pctr=st.lists(st.floats(0.0, 1.0), min_size=6, max_size=6),
)
def test_expected_payments_are_bid_times_pctr_of_the_parsed_allocation(bids, order, pctr):
    ads = tuple(AdCandidate(ad_id=f"a{i}", advertiser_id="v", text="t", bid=b) for i, b in enumerate(bids))
    request = AuctionRequest(request_id="r", user_id="u", query="q", ads=ads)
    chosen = [i for i in order if i < len(bids)][:3]
    response = "organic " + " ".join(f"[AD {i + 1}] text" for i in chosen)
    out = prediction(
        request,
        response,
        response_id="x",
        policy_version="1",
        served_at=datetime(2026, 1, 1),
        max_ads=3,
        pctr=pctr[: len(chosen)],
    )
    assert [a["ad_id"] for a in out["allocation"]] == [f"a{i}" for i in chosen]
    for slot, ad in enumerate(out["allocation"]):
        assert ad["expected_payment"] == pytest.approx(bids[chosen[slot]] * pctr[slot])
    assert out["expected_revenue"] == pytest.approx(sum(a["expected_payment"] for a in out["allocation"]))


def test_counting_prompt_tokens_on_the_event_loop_does_not_break_a_padded_batch():
    """The server counts a prompt's tokens on the event loop while the model thread encodes a
    padded batch: with one shared fast tokenizer the count switches the padding off mid-batch.
    """
    from llm_auction.config import GenerationConfig
    from llm_auction.policy.tokenizer import train_tokenizer
    from llm_auction.serving.server import ServedPolicy

    corpus = [f"query {i} about shoes and {'very ' * (i % 7)}long answers" for i in range(200)]
    served = ServedPolicy("1", None, train_tokenizer(corpus, 300), 512, GenerationConfig(), None, None)
    batch = [corpus[i] for i in range(0, 70, 7)]  # lengths differ: padding is needed
    errors: list[BaseException] = []
    stop = threading.Event()

    def encode_batches() -> None:
        try:
            for _ in range(20000):
                served.tokenizer(batch, return_tensors="pt", padding=True)
        except BaseException as exc:  # noqa: BLE001 - the failure is the finding
            errors.append(exc)
        finally:
            stop.set()

    model_thread = threading.Thread(target=encode_batches)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads often: the race within a few hundred batches
    try:
        model_thread.start()
        counts = 0
        while not stop.is_set():
            assert served.prompt_tokens(corpus[3]) > 0
            counts += 1
        model_thread.join()
    finally:
        sys.setswitchinterval(interval)
    assert counts > 100 and not errors, errors[:1]
