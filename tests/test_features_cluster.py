"""The `cluster` profile's stores for real: Feast SQL registry on PostgreSQL, Redis online store.

Each test skips, saying why, when its service is not listening on loopback. Nothing is left
behind: the registry lives in a schema made for the test and dropped after it, and the Redis keys
carry a project name made for the test and are deleted after it.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llm_auction.baselines import make_baseline
from llm_auction.config import Settings, load_config
from llm_auction.features.encoder import TextEncoder
from llm_auction.features.ingest import ingest_window, labeled_impressions
from llm_auction.features.retrieval import online_features, online_profile
from llm_auction.features.store import open_store
from llm_auction.public.feedback import write_feedback
from llm_auction.simulator.experiment import build_environment, evaluate_policy
from llm_auction.simulator.feedback import feedback_logs

PG_HOST, PG_PORT, PG_DATABASE = "127.0.0.1", 5432, "test"
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SMALL_WORLD = {"n_advertisers": 6, "n_users": 20, "n_queries": 30, "n_requests": 60}
T0 = pd.Timestamp("2026-01-01T00:00:00Z")
VIEWS = {"user_profile_fv", "user_stats_fv", "ad_fv", "ad_stats_fv", "feedback_fv"}


def _listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _postgres_user() -> str:
    """A role that can log in without a password (trust auth), or skip saying why not."""
    if not _listening(PG_HOST, PG_PORT):
        pytest.skip(f"PostgreSQL is not listening on {PG_HOST}:{PG_PORT}")
    psycopg = pytest.importorskip("psycopg", reason="psycopg (v3) is not installed: add feast[postgres]")
    for user in ("postgres", "root"):
        try:
            psycopg.connect(
                host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=user, connect_timeout=3
            ).close()
            return user
        except psycopg.OperationalError:
            continue
    pytest.skip(f"no passwordless role (postgres, root) can open database {PG_DATABASE!r}")


@pytest.fixture
def registry_uri() -> Iterator[str]:
    """A SQLAlchemy URI whose search_path is a fresh schema, dropped after the test."""
    import psycopg

    user = _postgres_user()
    schema = f"feast_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=user, autocommit=True) as conn:
        conn.execute(f'CREATE SCHEMA "{schema}"')
    yield f"postgresql+psycopg://{user}@{PG_HOST}:{PG_PORT}/{PG_DATABASE}?options=-csearch_path%3D{schema}"
    with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=user, autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


@pytest.fixture
def redis_project() -> Iterator[str]:
    """A Feast project name of this test only; its Redis keys are deleted after it."""
    if not _listening(REDIS_HOST, REDIS_PORT):
        pytest.skip(f"Redis is not listening on {REDIS_HOST}:{REDIS_PORT}")
    redis = pytest.importorskip("redis", reason="redis-py is not installed: add feast[redis]")
    project = f"llm_auction_test_{uuid.uuid4().hex[:12]}"
    yield project
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    for key in _redis_keys(client, project):
        client.delete(key)
    client.close()


def _redis_keys(client, project: str) -> list[bytes]:
    """Keys Feast wrote for `project` (its Redis keys end with the project name)."""
    return list(client.scan_iter(match=b"*" + project.encode()))


def _cluster_settings(root: Path, registry_uri: str, redis_url: str | None) -> Settings:
    return load_config(
        profile="cluster",
        environ={},
        overrides={
            "world": SMALL_WORLD,
            "mechanism": {"bootstrap_samples": 50},
            "features": {
                "data_dir": str(root / "features"),
                "quarantine_dir": str(root / "quarantine"),
                "registry_uri": registry_uri,
                "redis_url": redis_url,
            },
        },
    )


def _close(store) -> None:
    registry = store.registry
    for engine in {registry.write_engine, registry.read_engine}:
        engine.dispose()


def test_sql_registry_on_postgres_applies_idempotently(registry_uri: str, tmp_path: Path):
    import psycopg

    settings = _cluster_settings(tmp_path, registry_uri, redis_url=None)
    store = open_store(settings, project=f"llm_auction_test_{uuid.uuid4().hex[:12]}")
    again = open_store(settings, project=store.project)
    try:
        assert {fv.name for fv in again.list_feature_views()} == VIEWS
        assert again.get_feature_service("pctr_v1").name == "pctr_v1"
        assert type(again.registry).__name__ == "SqlRegistry"
    finally:
        _close(store)
        _close(again)
    schema = registry_uri.rsplit("%3D", 1)[1]
    user = registry_uri.split("//", 1)[1].split("@", 1)[0]
    with psycopg.connect(host=PG_HOST, port=PG_PORT, dbname=PG_DATABASE, user=user) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", (schema,)
            )
        }
    assert {"feature_views", "entities", "feature_services"} <= tables


def test_cluster_profile_ingests_materializes_to_redis_and_serves(
    registry_uri: str, redis_project: str, tmp_path: Path
):
    settings = _cluster_settings(tmp_path, registry_uri, redis_url=f"{REDIS_HOST}:{REDIS_PORT}")
    env = build_environment(settings)
    requests = env.world.auction_requests()
    result, _ = evaluate_policy(env, make_baseline("random", settings), requests, seed=5)
    served_at = env.world.requests.set_index("request_id")["timestamp"]
    impressions, clicks = feedback_logs(result, requests, served_at, "random-v0", np.random.default_rng(5))
    write_feedback(tmp_path / "feedback", "batch-0", impressions, clicks)

    store = open_store(settings, project=redis_project)
    try:
        world = env.world
        end = T0 + pd.Timedelta(hours=2)
        report = ingest_window(
            store, settings, tmp_path / "feedback", world.users, world.ads, T0, end, TextEncoder()
        )
        assert report.labeled_rows_new == len(impressions) and report.materialized_to is not None
        import redis

        with redis.Redis(host=REDIS_HOST, port=REDIS_PORT) as client:
            assert len(_redis_keys(client, redis_project)) >= len(env.world.users) + len(env.world.ads)
        users = env.world.users
        assert online_profile(store, users["user_id"].tolist()) == dict(
            zip(users["user_id"], users["profile_text"])
        )
        labeled = labeled_impressions(settings)
        frame = online_features(store, labeled["user_id"].tolist(), labeled["ad_id"].tolist())
        expected = labeled["ad_id"].map(labeled.groupby("ad_id").size())
        np.testing.assert_array_equal(frame["ad_stats_fv__impressions_7d"].to_numpy(), expected.to_numpy())
        assert frame["ad_fv__ad_embedding"].map(lambda v: v.shape == (384,)).all()
    finally:
        _close(store)
