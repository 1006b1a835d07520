from pathlib import Path

import numpy as np

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


def test_truthful_bids_equal_values_and_strategies_shift_them():
    truthful = generate_world(SMALL, seed=2)
    assert np.allclose(truthful.ads["bid"], truthful.ads["value_per_click"])
    shaded = generate_world(SMALL.model_copy(update={"bid_strategy": "shade"}), seed=2)
    assert (shaded.ads["bid"] < shaded.ads["value_per_click"]).all()
    inflated = generate_world(SMALL.model_copy(update={"bid_strategy": "inflate"}), seed=2)
    assert (inflated.ads["bid"] > inflated.ads["value_per_click"]).all()


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
