from pathlib import Path

import numpy as np
import pandas as pd

from llm_auction.config import WorldConfig
from llm_auction.world import CATEGORY_NAMES, World, generate_world

SMALL = WorldConfig(n_advertisers=20, n_users=50, n_queries=40, n_requests=200, k_candidates=5)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_same_seed_gives_byte_identical_parquet(tmp_path: Path):
    generate_world(SMALL, seed=3).save(tmp_path / "a")
    generate_world(SMALL, seed=3).save(tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert set(a) == {
        "advertisers.parquet",
        "ads.parquet",
        "users.parquet",
        "queries.parquet",
        "requests.parquet",
        "world.json",
    }
    assert a == b


def test_another_seed_differs(tmp_path: Path):
    generate_world(SMALL, seed=3).save(tmp_path / "a")
    generate_world(SMALL, seed=4).save(tmp_path / "b")
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert all(a[name] != b[name] for name in a if name.endswith(".parquet"))


def test_round_trip_and_shapes(tmp_path: Path):
    world = generate_world(SMALL, seed=1)
    world.save(tmp_path)
    loaded = World.load(tmp_path)
    assert loaded.seed == 1
    assert len(loaded.ads) == SMALL.n_advertisers * SMALL.ads_per_advertiser
    assert len(loaded.requests) == SMALL.n_requests
    assert loaded.requests["ad_ids"].map(len).eq(SMALL.k_candidates).all()
    assert loaded.requests["ad_ids"].map(lambda ids: len(set(ids))).eq(SMALL.k_candidates).all()
    assert loaded.requests["timestamp"].is_monotonic_increasing
    assert loaded.queries["text"].is_unique
    assert set(loaded.ads["category"]) <= set(CATEGORY_NAMES)


def test_truthful_base_bids_equal_values_and_strategies_shift_them():
    truthful = generate_world(SMALL, seed=2)
    assert np.allclose(truthful.ads["base_bid"], truthful.ads["value_per_click"])
    shaded = generate_world(SMALL.model_copy(update={"bid_strategy": "shade"}), seed=2)
    assert (shaded.ads["base_bid"] < shaded.ads["value_per_click"]).all()
    inflated = generate_world(SMALL.model_copy(update={"bid_strategy": "inflate"}), seed=2)
    assert (inflated.ads["base_bid"] > inflated.ads["value_per_click"]).all()


def _bids_by_ad(world: World) -> pd.DataFrame:
    return pd.DataFrame(
        [
            (a, b)
            for ids, bids in zip(world.requests["ad_ids"], world.requests["bids"])
            for a, b in zip(ids, bids)
        ],
        columns=["ad_id", "bid"],
    ).join(world.ads.set_index("ad_id")["base_bid"], on="ad_id")


def test_bids_change_per_auction_around_the_base_bid():
    world = generate_world(SMALL.model_copy(update={"n_requests": 2000}), seed=2)
    bids = _bids_by_ad(world)
    spread = bids.groupby("ad_id")["bid"].agg(["nunique", "count"])
    repeated = spread[spread["count"] >= 5]
    assert len(repeated) > 10 and (repeated["nunique"] > 1).all()
    ratio = bids["bid"] / bids["base_bid"]
    assert 0.9 < ratio.mean() < 1.1 and ratio.std() > 0.15
    requests = world.auction_requests(limit=50)
    assert [r.bids for r in requests] == [tuple(b) for b in world.requests["bids"].iloc[:50]]


def test_bids_without_noise_or_campaigns_are_the_base_bids():
    fixed = SMALL.model_copy(update={"bid_noise": 0.0, "campaign_amplitude": 0.0})
    bids = _bids_by_ad(generate_world(fixed, seed=2))
    assert np.allclose(bids["bid"], bids["base_bid"].round(2))


def test_retrieval_is_mostly_on_category():
    world = generate_world(SMALL.model_copy(update={"retrieval_noise": 0.2, "n_advertisers": 80}), seed=5)
    category = dict(zip(world.ads["ad_id"], world.ads["category"]))
    query_category = dict(zip(world.queries["text"], world.queries["category"]))
    on = [
        category[a] == query_category[q]
        for q, ids in zip(world.requests["query"], world.requests["ad_ids"])
        for a in ids
    ]
    assert np.mean(on) > 0.7


def test_auction_requests_carry_public_fields_only():
    world = generate_world(SMALL, seed=1)
    request = world.auction_requests(limit=1)[0]
    assert request.request_id == world.requests["request_id"].iat[0]
    assert len(request.ads) == SMALL.k_candidates
    assert not hasattr(request.ads[0], "quality")


def test_candidates_listed_by_bid_are_the_same_auctions_reordered():
    retrieved = generate_world(SMALL, seed=3).requests
    ranked = generate_world(SMALL.model_copy(update={"candidate_order": "bid"}), seed=3).requests
    assert not all(list(b) == sorted(b, reverse=True) for b in retrieved["bids"])  # retrieval: unordered
    for before, after in zip(retrieved.itertuples(), ranked.itertuples(), strict=True):
        assert list(after.bids) == sorted(after.bids, reverse=True)
        as_retrieved = set(zip(before.ad_ids, before.values, before.bids))
        assert set(zip(after.ad_ids, after.values, after.bids)) == as_retrieved  # each ad keeps its own
