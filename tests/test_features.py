"""Feast ingest and retrieval on the `local` profile, for real: sqlite online store, parquet files."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from feast import FeatureStore

from llm_auction.baselines import make_baseline
from llm_auction.config import Settings, load_config
from llm_auction.features.encoder import TextEncoder
from llm_auction.features.ingest import IngestReport, ingest_window, labeled_impressions
from llm_auction.features.retrieval import (
    cached,
    online_features,
    online_lookups,
    online_profile,
    training_frame,
)
from llm_auction.features.store import open_store, repo_dir
from llm_auction.public.feedback import write_feedback
from llm_auction.simulator.experiment import Environment, build_environment, evaluate_policy
from llm_auction.simulator.feedback import feedback_logs

SMALL_WORLD = {"n_advertisers": 8, "n_users": 30, "n_queries": 40, "n_requests": 160}
T0 = pd.Timestamp("2026-01-01T00:00:00Z")
# Two windows over the ~80 minutes of traffic; the second runs long enough to collect late clicks.
WINDOWS = ((T0, T0 + pd.Timedelta(minutes=40)), (T0 + pd.Timedelta(minutes=40), T0 + pd.Timedelta(hours=3)))
STATS = [
    f"{view}__{name}_{days}d"
    for view in ("user_stats_fv", "ad_stats_fv")
    for name in ("impressions", "clicks", "ctr")
    for days in (1, 7)
]


def _settings(root: Path) -> Settings:
    return load_config(
        environ={},
        overrides={
            "world": SMALL_WORLD,
            "mechanism": {"bootstrap_samples": 50},
            "features": {"data_dir": str(root / "features"), "quarantine_dir": str(root / "quarantine")},
        },
    )


@dataclass
class Ingested:
    settings: Settings
    env: Environment
    feedback: Path
    store: FeatureStore
    reports: list[IngestReport]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    return TextEncoder()


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> tuple[Environment, pd.DataFrame, pd.DataFrame]:
    """Impressions and clicks of random insertion on a small world."""
    env = build_environment(_settings(tmp_path_factory.mktemp("traffic")))
    requests = env.world.auction_requests()
    allocator = make_baseline("random", env.settings)
    result, _ = evaluate_policy(env, allocator, requests, seed=3)
    served_at = env.world.requests.set_index("request_id")["timestamp"]
    impressions, clicks = feedback_logs(result, requests, served_at, "random-v0", np.random.default_rng(3))
    return env, impressions, clicks


@pytest.fixture(scope="module")
def ingested(traffic, encoder: TextEncoder, tmp_path_factory: pytest.TempPathFactory) -> Ingested:
    env, impressions, clicks = traffic
    root = tmp_path_factory.mktemp("features")
    settings = _settings(root)
    write_feedback(root / "feedback", "batch-0", impressions, clicks)
    store = open_store(settings)
    reports = [
        ingest_window(store, settings, root / "feedback", env.world.users, env.world.ads, s, e, encoder)
        for s, e in WINDOWS
    ]
    return Ingested(settings, env, root / "feedback", store, reports)


def _online_snapshot(ingested: Ingested) -> pd.DataFrame:
    pairs = labeled_impressions(ingested.settings)[["user_id", "ad_id"]].drop_duplicates()
    frame = online_features(ingested.store, pairs["user_id"].tolist(), pairs["ad_id"].tolist())
    return frame.sort_index(axis=1)


def _offline_snapshot(settings: Settings) -> dict[str, pd.DataFrame]:
    root = Path(settings.features.data_dir)
    return {
        name: pd.concat(
            [pd.read_parquet(p) for p in sorted((root / name).glob("*.parquet"))], ignore_index=True
        )
        for name in ("labeled_impressions", "user_profile", "ad", "user_stats", "ad_stats")
    }


def test_ingest_counts_every_event_of_the_window(ingested: Ingested, traffic):
    _, impressions, clicks = traffic
    first, second = ingested.reports
    assert first.impressions_read + second.impressions_read == len(impressions)
    assert first.labeled_rows_new + second.labeled_rows_new == len(impressions)
    late = second.quarantined.get("late_click", 0)
    assert first.clicks_accepted + second.clicks_accepted + late == len(clicks)
    shown_at = impressions.set_index(["response_id", "ad_id"])["event_timestamp"]
    shown = shown_at.reindex(pd.MultiIndex.from_frame(clicks[["response_id", "ad_id"]])).to_numpy()
    end_1 = WINDOWS[0][1]
    assert late == ((shown < end_1) & (clicks["event_timestamp"] >= end_1).to_numpy()).sum()
    assert set(second.quarantined) <= {"late_click"} and not first.quarantined
    assert first.embeddings_computed > 0 and second.embeddings_computed == 0
    assert first.materialized_to == WINDOWS[0][1] and second.materialized_from == WINDOWS[0][1]
    labeled = labeled_impressions(ingested.settings)
    assert labeled["clicked"].sum() == first.clicks_accepted + second.clicks_accepted
    assert labeled["event_id"].is_unique


def test_ingesting_a_window_again_changes_nothing(ingested: Ingested, encoder: TextEncoder):
    offline, online = _offline_snapshot(ingested.settings), _online_snapshot(ingested)
    world = ingested.env.world
    store = open_store(ingested.settings)  # applying the definitions again keeps what was materialized
    again = [
        ingest_window(store, ingested.settings, ingested.feedback, world.users, world.ads, s, e, encoder)
        for s, e in WINDOWS
    ]
    for before, after in zip(ingested.reports, again):
        assert after.labeled_rows_new == 0 and after.embeddings_computed == 0
        assert after.labeled_rows_window == before.labeled_rows_window
        assert after.quarantined == before.quarantined
        assert after.materialized_to is None  # the online store is already past these windows
    for name, frame in _offline_snapshot(ingested.settings).items():
        pd.testing.assert_frame_equal(frame, offline[name], obj=name)
    pd.testing.assert_frame_equal(_online_snapshot(ingested), online)


def _expected_stats(labeled: pd.DataFrame, key: str, as_of: pd.Timestamp | None, value: str) -> pd.Series:
    """Impressions or clicks (7 days) of each row's entity from labeled rows before `as_of`.

    NaN for an entity with no impression at all before `as_of`: it has no statistics row yet.
    """
    if as_of is None:
        return pd.Series(np.nan, index=labeled.index)
    before = labeled[labeled["event_timestamp"] < as_of]
    recent = before[before["event_timestamp"] >= as_of - pd.Timedelta(days=7)]
    counts = recent.groupby(key)["clicked"].agg(impressions="size", clicks="sum")[value]
    counts = counts.reindex(before[key].unique(), fill_value=0)
    return labeled[key].map(counts).astype(float)


def test_training_rows_only_see_statistics_from_before_them(ingested: Ingested, encoder: TextEncoder):
    # Window 1 again, now that window 2 is in the offline store: its statistics must still ignore it.
    world = ingested.env.world
    start, end = WINDOWS[0]
    ingest_window(
        ingested.store, ingested.settings, ingested.feedback, world.users, world.ads, start, end, encoder
    )
    labeled = labeled_impressions(ingested.settings)
    frame = training_frame(ingested.store, labeled)
    assert len(frame) == len(labeled)
    assert (frame["event_id"] == labeled["event_id"]).all()
    (_, end_1), (_, end_2) = WINDOWS
    in_first = labeled["event_timestamp"] < end_1
    for key, view in (("user_id", "user_stats_fv"), ("ad_id", "ad_stats_fv")):
        for value in ("impressions", "clicks"):
            got = frame[f"{view}__{value}_7d"]
            # Window 1 impressions precede every statistic (written at the windows' ends).
            assert got[in_first].isna().all()
            # Window 2 impressions see the statistics as of end_1, never those as of end_2.
            expected = _expected_stats(labeled, key, end_1, value)[~in_first]
            np.testing.assert_array_equal(got[~in_first].to_numpy(float), expected.to_numpy())
        leaky = _expected_stats(labeled, key, end_2, "impressions")[~in_first]
        assert (leaky.fillna(-1) != frame[f"{view}__impressions_7d"][~in_first].fillna(-1)).any(), "can fail"


def test_training_frame_fills_missing_statistics_and_carries_embeddings(
    ingested: Ingested, encoder: TextEncoder
):
    labeled = labeled_impressions(ingested.settings)
    frame = training_frame(ingested.store, labeled, ingested.settings.features)
    assert not frame[STATS].isna().any().any()
    assert (
        frame.loc[labeled["event_timestamp"] < WINDOWS[0][1], "user_stats_fv__ctr_7d"] == 1.0 / 20.0
    ).all()
    profiles = ingested.env.world.users.set_index("user_id")["profile_text"]
    row = frame.iloc[0]
    assert row["user_profile_fv__profile_embedding"].dtype == np.float32
    np.testing.assert_allclose(
        row["user_profile_fv__profile_embedding"], encoder.encode([profiles[row["user_id"]]])[0], rtol=1e-6
    )
    ads = ingested.env.world.ads.set_index("ad_id")
    assert (frame["ad_fv__category"] == frame["ad_id"].map(ads["category"])).all()
    assert (frame["n_same_category"] >= 0).all() and (frame["n_same_category"] < frame["n_ads"]).all()


def test_online_store_serves_materialized_profiles_and_latest_statistics(ingested: Ingested):
    users = ingested.env.world.users
    some = users["user_id"].tolist()[:5]
    assert online_profile(ingested.store, [*some, "nobody"]) == dict(zip(some, users["profile_text"][:5]))

    labeled = labeled_impressions(ingested.settings)
    pairs = labeled[["user_id", "ad_id"]].drop_duplicates().head(20)
    frame = online_features(ingested.store, pairs["user_id"].tolist(), pairs["ad_id"].tolist())
    history = labeled[labeled["event_timestamp"] < WINDOWS[1][1]]
    expected = pairs["user_id"].map(history.groupby("user_id").size())
    np.testing.assert_array_equal(frame["user_stats_fv__impressions_7d"].to_numpy(), expected.to_numpy())
    assert frame["ad_fv__ad_embedding"].map(lambda v: v.shape == (384,) and v.dtype == np.float32).all()


def test_psis_lookups_read_each_entity_once_per_ttl_and_answer_as_the_store(ingested: Ingested, monkeypatch):
    """The scorer's feature lookups keep what they read for `online_cache_ttl_s`: the same frame as
    reading the store every time, unknown ids included, with only the ids not seen asked for."""
    asked: list[int] = []
    real = ingested.store.get_online_features

    def counted(**request):
        asked.append(len(request["entity_rows"]))
        return real(**request)

    monkeypatch.setattr(ingested.store, "get_online_features", counted)
    features = ingested.settings.features
    direct = online_lookups(ingested.store, features.model_copy(update={"online_cache_ttl_s": 0}))
    users, ads = online_lookups(ingested.store, features)
    known = ingested.env.world.users["user_id"].tolist()
    for lookup, plain, first, then in (
        (users, direct[0], [known[0], "nobody", known[1]], [known[2], known[1], "nobody", known[0]]),
        (
            ads,
            direct[1],
            ingested.env.world.ads["ad_id"].tolist()[:3],
            ingested.env.world.ads["ad_id"].tolist()[1:5],
        ),
    ):
        asked.clear()
        pd.testing.assert_frame_equal(lookup(first), plain(first))
        pd.testing.assert_frame_equal(lookup(then), plain(then))
        # cached: all of `first`, then only what `then` adds; uncached: each call in full
        new = len(set(then) - set(first))
        assert asked == [len(first), len(first), new, len(then)], asked

    # Past the TTL the store is read again.
    reads: list[list[str]] = []
    short = cached(lambda ids: reads.append(list(ids)) or plain(ids), "ad_id", ttl_s=0.2, max_entries=10)
    ids = ingested.env.world.ads["ad_id"].tolist()[:2]
    short(ids), short(ids)
    time.sleep(0.3)
    pd.testing.assert_frame_equal(short(ids), plain(ids))
    assert reads == [ids, ids]


def test_bad_events_are_quarantined_with_their_reason(traffic, encoder: TextEncoder, tmp_path: Path):
    env, impressions, clicks = traffic
    start, end = WINDOWS[0]
    good = impressions[impressions["event_timestamp"] < end]
    clicked = set(zip(clicks["response_id"], clicks["ad_id"]))
    template = good[[key not in clicked for key in zip(good["response_id"], good["ad_id"])]].iloc[0].to_dict()
    bad = pd.DataFrame(
        [
            template | {"event_id": "imp:bad-ad", "response_id": "bad-1", "ad_id": "no-such-ad"},
            template | {"event_id": "imp:bad-time", "response_id": "bad-2", "event_timestamp": pd.NaT},
            template | {"event_id": "imp:bad-bid", "response_id": "bad-3", "bid": 0.0},
            template | {"event_id": "imp:bad-position", "response_id": "bad-4", "position": 9},
            template,  # an exact copy: de-duplicated, not quarantined
            template | {"bid": template["bid"] + 1},  # the same event id with other content
        ]
    )
    in_window = clicks[clicks["event_timestamp"] < end]
    orphan = in_window.iloc[:1].assign(event_id="clk:orphan", response_id="none")
    # A click on a window-1 impression arriving in window 2: window 1 has already labeled it 0.
    late = orphan.assign(
        event_id="clk:late", response_id=template["response_id"], ad_id=template["ad_id"], event_timestamp=end
    )
    feedback = tmp_path / "feedback"
    write_feedback(feedback, "good", impressions, clicks)
    write_feedback(feedback, "bad", bad, pd.concat([orphan, late]))
    settings = _settings(tmp_path)
    store = open_store(settings)

    report = ingest_window(store, settings, feedback, env.world.users, env.world.ads, start, end, encoder)

    assert report.quarantined == {
        "conflicting_duplicate": 2,
        "invalid_bid": 1,
        "invalid_position": 1,
        "missing_timestamp": 1,
        "orphan_click": 1,
        "unknown_ad": 1,
    }
    assert report.duplicates_dropped == 1
    assert report.impressions_read == len(good) + len(bad)
    assert report.impressions_accepted == report.labeled_rows_new == len(good) - 1  # the conflicting original
    quarantined = pd.read_parquet(report.quarantine_path)
    reasons = dict(zip(quarantined["event_id"], quarantined["reason"]))
    assert reasons["imp:bad-ad"] == "unknown_ad" and reasons["imp:bad-time"] == "missing_timestamp"
    assert reasons["imp:bad-bid"] == "invalid_bid" and reasons["clk:orphan"] == "orphan_click"
    assert reasons[template["event_id"]] == "conflicting_duplicate"
    labeled = labeled_impressions(settings)
    assert set(labeled["event_id"]) == set(good["event_id"]) - {template["event_id"]}

    second = ingest_window(store, settings, feedback, env.world.users, env.world.ads, *WINDOWS[1], encoder)
    reasons = dict(pd.read_parquet(second.quarantine_path)[["event_id", "reason"]].to_numpy())
    assert reasons["clk:late"] == "late_click" and reasons["imp:bad-time"] == "missing_timestamp"


@pytest.mark.slow
def test_feast_cli_applies_and_lists_the_repository(tmp_path: Path):
    project = tmp_path / "project"
    shutil.copytree(repo_dir(load_config(environ={}).features), project / "feature_repo")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLM_AUCTION")}
    feast = str(Path(sys.executable).with_name("feast"))
    for command in (["apply"], ["feature-views", "list"]):
        done = subprocess.run(
            [feast, *command],
            cwd=project / "feature_repo",
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    for view in ("user_profile_fv", "user_stats_fv", "ad_fv", "ad_stats_fv", "feedback_fv"):
        assert view in done.stdout
    assert (project / "data" / "features" / "registry.db").is_file()
