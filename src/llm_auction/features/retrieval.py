"""Features for the pCTR: point-in-time training frames offline, the same columns online.

Both paths read the feature service `pctr_v1` with full feature names (`<view>__<feature>`, e.g.
`user_stats_fv__ctr_7d`): the user and ad views carry the same statistic names, and one naming
for training and serving keeps the two from drifting apart.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pandas as pd
from cachetools import TTLCache
from feast import FeatureService, FeatureStore

from llm_auction.config import FeaturesConfig
from llm_auction.errors import ServiceUnavailable

logger = logging.getLogger(__name__)

FEATURE_SERVICE = "pctr_v1"
EMBEDDING_COLUMNS = ("user_profile_fv__profile_embedding", "ad_fv__ad_embedding")
STATS_VIEWS = ("user_stats_fv", "ad_stats_fv")
# Entity rows per point-in-time query of `training_frame`: bounds the memory of Feast's join.
ENTITY_ROWS_PER_QUERY = 200_000


def _as_float32(value: object) -> np.ndarray | None:
    if value is None or (np.isscalar(value) and pd.isna(value)):
        return None
    return np.asarray(value, dtype=np.float32)


def _embeddings_as_float32(
    frame: pd.DataFrame, shared: dict[str, dict[bytes, np.ndarray]] | None = None
) -> pd.DataFrame:
    """Embedding cells as float32 vectors (Feast returns lists or float64 arrays); None stays None.

    Equal vectors are one read-only array shared by their rows (`shared`, per column, carries them
    across calls): a training frame holds each user's and ad's vector once, not 1.5 KB a row.
    """
    shared = {} if shared is None else shared
    for column in EMBEDDING_COLUMNS:
        if column in frame:
            seen = shared.setdefault(column, {})
            cells = []
            for value in frame[column]:
                vector = _as_float32(value)
                if vector is not None:
                    key = vector.tobytes()
                    if key not in seen:
                        vector = np.array(vector, copy=True)  # not a view into Feast's whole answer
                        vector.flags.writeable = False
                        seen[key] = vector
                    vector = seen[key]
                cells.append(vector)
            frame[column] = cells
    return frame


def fill_missing_stats(frame: pd.DataFrame, features: FeaturesConfig) -> pd.DataFrame:
    """Statistics of entities with no history: zero counts and the prior CTR.

    A user or ad appears in the stats views only after a window in which it was shown has been
    ingested, so the first impressions of anyone have no statistics; training and serving must
    fill them the same way.
    """
    prior = features.ctr_prior_clicks / features.ctr_prior_impressions
    for view in STATS_VIEWS:
        for days in features.stats_windows_days:
            for name, value in (("impressions", 0), ("clicks", 0), ("ctr", prior)):
                column = f"{view}__{name}_{days}d"
                if column in frame:
                    # online rows of unknown entities come back as None (object dtype): numbers first
                    frame[column] = pd.to_numeric(frame[column]).fillna(value)
                    if name != "ctr":
                        frame[column] = frame[column].astype("int64")
    return frame


def _view_requests(store: FeatureStore, service: FeatureService) -> list[tuple[list[str], list[str]]]:
    """(join keys, feature references) of each feature view of the service."""
    requests = []
    for projection in service.feature_view_projections:
        view = store.get_feature_view(projection.name)
        keys = sorted(column.name for column in view.entity_columns)
        requests.append((keys, [f"{projection.name_to_use()}:{f.name}" for f in projection.features]))
    return requests


def training_frame(
    store: FeatureStore, labeled: pd.DataFrame, features: FeaturesConfig | None = None
) -> pd.DataFrame:
    """The labeled impressions joined point-in-time with the `pctr_v1` features.

    Each row gets the feature values valid at its `event_timestamp` (never later ones), so a
    statistic that counts an impression's own click cannot leak into its features.

    Feast is asked once per feature view for the distinct (join keys, timestamp) pairs (in slices
    of `ENTITY_ROWS_PER_QUERY`), and the answers are merged back: Feast 0.67's file (dask) offline
    store collapses entity rows that share a join key and timestamp (feast-dev/feast#6787; every
    ad of one response shares its user and time), and drops an entity row whose rows in one view
    are all later than it instead of returning it without that view's features (so one view's gap
    would erase the others).

    Args:
        store: The feature store (`open_store`).
        labeled: Entity frame: `event_timestamp`, `user_id`, `ad_id` and any other columns
            (e.g. from `labeled_impressions`), which are kept.
        features: If given, missing statistics are filled with zeros and the prior CTR
            (`fill_missing_stats`); if None they stay NaN.

    Returns:
        `labeled` in its own row order, plus one column per feature.
    """
    if labeled.empty:
        raise ValueError("labeled: no impressions to build a training frame from")
    frame = labeled.reset_index(drop=True)
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True)
    shared: dict[str, dict[bytes, np.ndarray]] = {}
    for keys, refs in _view_requests(store, store.get_feature_service(FEATURE_SERVICE)):
        on = [*keys, "event_timestamp"]
        entity_df = frame[on].drop_duplicates().reset_index(drop=True)
        parts = []
        # A slice of entity rows at a time: the join's own memory stays bounded whatever the size
        # (each slice reads the view's source again: entities x windows, not impressions).
        for start in range(0, len(entity_df), ENTITY_ROWS_PER_QUERY):
            part = store.get_historical_features(
                entity_df=entity_df.iloc[start : start + ENTITY_ROWS_PER_QUERY],
                features=refs,
                full_feature_names=True,
            ).to_df()
            part["event_timestamp"] = pd.to_datetime(part["event_timestamp"], utc=True).astype(
                frame["event_timestamp"].dtype
            )
            parts.append(_embeddings_as_float32(part, shared))
        joined = pd.concat(parts, ignore_index=True)
        frame = frame.merge(joined, on=on, how="left", validate="many_to_one")
    logger.info("training frame: %d rows, %d columns", len(frame), frame.shape[1])
    return frame if features is None else fill_missing_stats(frame, features)


def pctr_inputs(frame: pd.DataFrame) -> pd.DataFrame:
    """Feast's `<view>__<feature>` columns under the names the pCTR model reads (`user_ctr_7d`, `ad_text`)."""
    renamed = {}
    for column in frame.columns:
        view, sep, feature = column.partition("__")
        if not sep:
            continue
        if view == "user_stats_fv":
            renamed[column] = f"user_{feature}"
        elif view == "ad_stats_fv":
            renamed[column] = f"ad_{feature}"
        else:
            renamed[column] = feature
    return frame.rename(columns=renamed)


def read_online(store: FeatureStore, **request: Any) -> Any:
    """`store.get_online_features(**request)`; a store that fails to answer is `ServiceUnavailable`.

    Whatever the online store raises (Redis refusing connections, a locked or missing SQLite file)
    is the store's state, not the caller's input: servers answer it with a 503, not a 500.
    """
    try:
        return store.get_online_features(**request)
    except Exception as exc:
        raise ServiceUnavailable(
            f"feature store: the online store did not answer ({type(exc).__name__}: {exc})"
        ) from exc


def online_profile(store: FeatureStore, user_ids: Sequence[str]) -> dict[str, str]:
    """Profile text h of each known user, as the auction request needs it; unknown users are left out."""
    response = read_online(
        store, features=["user_profile_fv:profile_text"], entity_rows=[{"user_id": u} for u in user_ids]
    ).to_dict()
    return {u: text for u, text in zip(response["user_id"], response["profile_text"]) if text is not None}


def online_features(
    store: FeatureStore,
    user_ids: Sequence[str],
    ad_ids: Sequence[str],
    features: FeaturesConfig | None = None,
) -> pd.DataFrame:
    """The `pctr_v1` features of (user, ad) pairs, `user_ids[i]` with `ad_ids[i]`, for serving.

    Columns are those `training_frame` adds, so the reward model sees the same inputs online.

    Args:
        store: The feature store (`open_store`).
        user_ids: User of each pair.
        ad_ids: Ad of each pair (same length as `user_ids`).
        features: If given, missing statistics are filled as in training (`fill_missing_stats`).
    """
    if len(user_ids) != len(ad_ids):
        raise ValueError(f"ad_ids: {len(ad_ids)} ads for {len(user_ids)} users; pass one ad per user")
    frame = read_online(
        store,
        features=store.get_feature_service(FEATURE_SERVICE),
        entity_rows=[{"user_id": u, "ad_id": a} for u, a in zip(user_ids, ad_ids)],
        full_feature_names=True,
    ).to_df()
    frame = _embeddings_as_float32(frame)
    return frame if features is None else fill_missing_stats(frame, features)


def online_lookups(
    store: FeatureStore, features: FeaturesConfig
) -> tuple[Callable[[Sequence[str]], pd.DataFrame], Callable[[Sequence[str]], pd.DataFrame]]:
    """(user lookup, ad lookup) over the online store, in the shape `reward.score_responses` takes.

    Each reads only the views of its own entity, so scoring M responses of one prompt asks for a
    user once and for each distinct ad once, not for every (user, ad) pair. Each keeps what it read
    for `features.online_cache_ttl_s` (`cached`): the server's psi batches ask for the same users
    and ads again and again (ranking, then pricing, the next request), and the online store
    changes only when a feedback window is materialised.
    """
    views: dict[str, list[str]] = {}
    for keys, refs in _view_requests(store, store.get_feature_service(FEATURE_SERVICE)):
        if len(keys) == 1:
            views.setdefault(keys[0], []).extend(refs)

    def lookup(key: str) -> Callable[[Sequence[str]], pd.DataFrame]:
        def read(ids: Sequence[str]) -> pd.DataFrame:
            frame = read_online(
                store, features=views[key], entity_rows=[{key: i} for i in ids], full_feature_names=True
            ).to_df()
            return pctr_inputs(fill_missing_stats(_embeddings_as_float32(frame), features))

        if features.online_cache_ttl_s == 0:
            return read
        return cached(read, key, features.online_cache_ttl_s, features.online_cache_max_entries)

    return lookup("user_id"), lookup("ad_id")


def cached(
    read: Callable[[Sequence[str]], pd.DataFrame], key: str, ttl_s: float, max_entries: int
) -> Callable[[Sequence[str]], pd.DataFrame]:
    """`read` (a frame with one row per id, keyed by column `key`) that reads each id at most once
    per `ttl_s` seconds: the rows of ids read less than `ttl_s` ago come from memory, the rest from
    one call of `read`. At most `max_entries` ids are kept (least recently used out first).

    Staleness is bounded by `ttl_s`, unknown ids included (a user who signs up is seen within it).
    """
    rows: TTLCache[str, dict[str, Any]] = TTLCache(max_entries, ttl_s)
    columns: list[str] = []
    lock = threading.Lock()  # cachetools' caches are not thread-safe

    def lookup(ids: Sequence[str]) -> pd.DataFrame:
        ids = list(ids)
        if not ids:
            return read(ids)
        with lock:
            found = {i: rows.get(i) for i in dict.fromkeys(ids)}  # taken once: an entry may expire
            missing = [i for i, row in found.items() if row is None]
            if missing:
                fresh = read(missing)
                columns[:] = fresh.columns
                for row in fresh.to_dict("records"):
                    rows[row[key]] = found[row[key]] = row
        return pd.DataFrame.from_records([found[i] for i in ids], columns=columns)

    return lookup
