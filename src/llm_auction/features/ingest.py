"""Ingest one feedback window into Feast: validate, label, upsert entities, recompute statistics.

One window [start, end) writes one parquet file per dataset under `features.data_dir`, named after
the window, and overwrites it when the window is ingested again; that, with de-duplication on
`event_id`, makes ingest idempotent. Datasets (folders) and what their rows mean:

- `labeled_impressions/`: accepted impressions with `clicked` (a click on it arrived before `end`).
- `user_profile/`, `ad/`: entity rows, valid from the `start` of the window that first saw them.
- `user_stats/`, `ad_stats/`: click history as of `end`, from labeled impressions strictly before it.

Rows that cannot be used go to `features.quarantine_dir/<window>.parquet` with a `reason`; they are
counted in the report, never dropped silently. Events without a timestamp cannot be placed in a
window, so every window's ingest reports them until the feedback store is repaired. Windows should
be ingested in time order: statistics as of `end` see only the windows already ingested, and
`materialize_incremental` moves the online store forward from where it last stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from feast import FeatureStore
from feast.infra.offline_stores.file_source import FileSource

from llm_auction.config import FeaturesConfig, Settings
from llm_auction.features.encoder import TextEncoder
from llm_auction.features.store import absolute_features, is_remote
from llm_auction.public.feedback import CLICK_COLUMNS, IMPRESSION_COLUMNS, read_feedback

logger = logging.getLogger(__name__)

LABELED = "labeled_impressions"
USER_PROFILE = "user_profile"
AD = "ad"
USER_STATS = "user_stats"
AD_STATS = "ad_stats"
EPOCH = pd.Timestamp("1970-01-01", tz="UTC")
TIMESTAMP = pa.timestamp("ns", tz="UTC")
EMBEDDING = pa.list_(pa.float32())

LABELED_SCHEMA = pa.schema(
    [
        ("event_timestamp", TIMESTAMP),
        ("event_id", pa.string()),
        ("request_id", pa.string()),
        ("response_id", pa.string()),
        ("user_id", pa.string()),
        ("ad_id", pa.string()),
        ("position", pa.int64()),
        ("n_ads", pa.int64()),
        ("n_same_category", pa.int64()),
        ("bid", pa.float64()),
        ("policy_version", pa.string()),
        ("query", pa.string()),
        ("response", pa.string()),
        ("clicked", pa.int64()),
    ]
)
USER_PROFILE_SCHEMA = pa.schema(
    [
        ("event_timestamp", TIMESTAMP),
        ("user_id", pa.string()),
        ("profile_text", pa.string()),
        ("profile_embedding", EMBEDDING),
    ]
)
AD_SCHEMA = pa.schema(
    [
        ("event_timestamp", TIMESTAMP),
        ("ad_id", pa.string()),
        ("ad_text", pa.string()),
        ("ad_embedding", EMBEDDING),
        ("advertiser_id", pa.string()),
        ("category", pa.string()),
    ]
)

# Why a row is quarantined; a row with several problems gets the first that applies, in this order.
IMPRESSION_REASONS = (
    "missing_event_id",
    "conflicting_duplicate",
    "missing_timestamp",
    "unknown_ad",
    "unknown_user",
    "invalid_bid",
    "invalid_position",
)
CLICK_REASONS = (
    "missing_event_id",
    "conflicting_duplicate",
    "missing_timestamp",
    "orphan_click",
    "impression_rejected",
    "late_click",
    "click_before_impression",
)


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class IngestReport:
    """What one window's ingest read, kept, rejected and wrote."""

    window: str = field(metadata=_help("Window name: start and end, as in file names."))
    impressions_read: int = field(metadata=_help("Impressions of the window, plus any without timestamp."))
    clicks_read: int = field(metadata=_help("Clicks that arrived in the window, plus any without timestamp."))
    duplicates_dropped: int = field(metadata=_help("Exact copies of an event (same id, same content)."))
    impressions_accepted: int = field(metadata=_help("Impressions that passed validation."))
    clicks_accepted: int = field(metadata=_help("Clicks attributed to an accepted impression."))
    quarantined: dict[str, int] = field(metadata=_help("Rejected events per reason."))
    labeled_rows_new: int = field(metadata=_help("Labeled impressions the offline store lacked."))
    labeled_rows_window: int = field(metadata=_help("Labeled impressions of the window in total."))
    materialized_from: datetime | None = field(metadata=_help("Start of the range loaded online, if any."))
    materialized_to: datetime | None = field(metadata=_help("End of the range loaded online, if any."))
    embeddings_computed: int = field(metadata=_help("Texts run through the encoder (not in its cache)."))
    quarantine_path: Path | None = field(metadata=_help("The window's quarantine file, if any."))

    @property
    def n_quarantined(self) -> int:
        return sum(self.quarantined.values())


def window_name(start: pd.Timestamp, end: pd.Timestamp) -> str:
    """File stem of a window, sortable by time: `20260101T000000Z_20260101T010000Z`."""
    return f"{start:%Y%m%dT%H%M%SZ}_{end:%Y%m%dT%H%M%SZ}"


def _window_bounds(name: str) -> tuple[pd.Timestamp, pd.Timestamp] | None:
    """(start, end) of a `window_name`, or None for a name that is not one."""
    first, sep, second = name.partition("_")
    try:
        start, end = pd.Timestamp(first), pd.Timestamp(second)
    except ValueError:
        return None
    if not sep or start is pd.NaT or end is pd.NaT:
        return None
    return to_utc(start), to_utc(end)


def to_utc(value: datetime | str) -> pd.Timestamp:
    """A timezone-aware UTC timestamp; naive input is taken as UTC, as Feast does."""
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


class _Datasets:
    """Parquet datasets (one folder each, one file per window) under a local folder or s3:// prefix."""

    def __init__(self, features: FeaturesConfig):
        self.features = features
        if is_remote(features.data_dir):
            self.fs, self.root = pafs.FileSystem.from_uri(features.data_dir)
        else:
            self.fs, self.root = pafs.LocalFileSystem(), features.data_dir

    def _folder(self, name: str) -> str:
        return f"{self.root.rstrip('/')}/{name}"

    def parts(self, name: str) -> list[str]:
        infos = self.fs.get_file_info(pafs.FileSelector(self._folder(name), allow_not_found=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File and i.path.endswith(".parquet"))

    def exists(self, name: str) -> bool:
        return bool(self.parts(name))

    def windows_overlapping(self, name: str, start: pd.Timestamp, end: pd.Timestamp) -> list[str]:
        """Window names of the dataset's files whose window meets [start, end) (a file whose name is
        not a window's is kept): what a window must read instead of the whole history.
        """
        names = []
        for path in self.parts(name):
            stem = Path(path).stem
            bounds = _window_bounds(stem)
            if bounds is None or (bounds[0] < end and start < bounds[1]):
                names.append(stem)
        return names

    def read(
        self,
        name: str,
        schema: pa.Schema,
        exclude: str | None = None,
        columns: Sequence[str] | None = None,
        windows: Sequence[str] | None = None,
    ) -> pd.DataFrame:
        """A dataset without the file of window `exclude`, typed by `schema` even when empty.

        Args:
            name: The dataset (folder).
            schema: Its schema.
            exclude: A window name whose file is skipped.
            columns: Only these columns (the history grows with every window).
            windows: Only the files of these windows (None: every file).
        """
        if columns is not None:
            schema = pa.schema([schema.field(c) for c in columns])
        keep = None if windows is None else set(windows)
        tables = [
            pq.read_table(p, filesystem=self.fs, columns=schema.names).cast(schema)
            for p in self.parts(name)
            if Path(p).stem != exclude and (keep is None or Path(p).stem in keep)
        ]
        return pa.concat_tables([schema.empty_table(), *tables]).to_pandas()

    def write(self, name: str, window: str, frame: pd.DataFrame, schema: pa.Schema) -> None:
        """Replace the window's file; an empty frame removes it (a re-ingest must not leave stale rows)."""
        path = f"{self._folder(name)}/{window}.parquet"
        if frame.empty:
            if self.fs.get_file_info(path).type == pafs.FileType.File:
                self.fs.delete_file(path)
            return
        self.fs.create_dir(self._folder(name), recursive=True)
        table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
        pq.write_table(table, path, filesystem=self.fs)


def _coerce_timestamps(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.copy()
    frame["event_timestamp"] = pd.to_datetime(frame["event_timestamp"], utc=True, errors="coerce")
    return frame


def _in_window(frame: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp) -> pd.Series:
    """Events of the window, plus those without a timestamp (they must be reported somewhere)."""
    ts = frame["event_timestamp"]
    return ts.isna() | ((ts >= start) & (ts < end))


def _conflicting_ids(events: pd.DataFrame) -> set[str]:
    """Event ids carried by two different events anywhere in the store (after exact duplicates go)."""
    ids = events["event_id"].dropna()
    return set(ids[ids.duplicated()])


def _first_reason(checks: dict[str, pd.Series], order: Sequence[str], index: pd.Index) -> pd.Series:
    """The first failing check of each row in priority `order`, None where every check passes."""
    reason = pd.Series(None, index=index, dtype=object)
    for name in order:
        failed = checks[name].fillna(True).astype(bool)
        reason = reason.where(reason.notna() | ~failed, name)
    return reason


def _impression_reasons(
    impressions: pd.DataFrame, conflicting: set[str], ad_ids: set[str], user_ids: set[str]
) -> pd.Series:
    bid, position, n_ads = (
        pd.to_numeric(impressions[c], errors="coerce").astype("float64") for c in ("bid", "position", "n_ads")
    )
    checks = {
        "missing_event_id": impressions["event_id"].isna(),
        "conflicting_duplicate": impressions["event_id"].isin(conflicting),
        "missing_timestamp": impressions["event_timestamp"].isna(),
        "unknown_ad": ~impressions["ad_id"].isin(ad_ids),
        "unknown_user": ~impressions["user_id"].isin(user_ids),
        "invalid_bid": ~(np.isfinite(bid) & (bid > 0)),
        "invalid_position": ~((position >= 1) & (position <= n_ads)),
    }
    return _first_reason(checks, IMPRESSION_REASONS, impressions.index)


def _keys(frame: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_frame(frame[["response_id", "ad_id"]].astype(object))


def _click_reasons(
    clicks: pd.DataFrame,
    conflicting: set[str],
    accepted: pd.DataFrame,
    rejected: pd.DataFrame,
    all_impressions: pd.DataFrame,
    start: pd.Timestamp,
) -> pd.Series:
    """Attribute each click to its impression by (response_id, ad_id), or say why it cannot be."""
    shown = accepted.drop_duplicates(["response_id", "ad_id"])
    shown_at = clicks[["response_id", "ad_id"]].merge(
        shown[["response_id", "ad_id", "event_timestamp"]], on=["response_id", "ad_id"], how="left"
    )["event_timestamp"]
    shown_at.index = clicks.index
    keys = _keys(clicks)
    earlier = all_impressions[all_impressions["event_timestamp"] < start]
    checks = {
        "missing_event_id": clicks["event_id"].isna(),
        "conflicting_duplicate": clicks["event_id"].isin(conflicting),
        "missing_timestamp": clicks["event_timestamp"].isna(),
        "orphan_click": pd.Series(~keys.isin(_keys(all_impressions)), index=clicks.index),
        "impression_rejected": pd.Series(keys.isin(_keys(rejected)), index=clicks.index),
        # Its impression belongs to a window that closed before the click arrived.
        "late_click": pd.Series(keys.isin(_keys(earlier)), index=clicks.index),
        # Its impression is later than the click (later in this window, or in a later one).
        "click_before_impression": ~(shown_at <= clicks["event_timestamp"]),
    }
    return _first_reason(checks, CLICK_REASONS, clicks.index)


def _n_same_category(impressions: pd.DataFrame, category: pd.Series) -> pd.Series:
    """Other ads of the same category in the same response (a competition-for-attention feature)."""
    shown = impressions[["response_id", "ad_id"]].drop_duplicates()
    shown = shown.assign(category=shown["ad_id"].map(category)).dropna(subset=["category"])
    per_category = shown.groupby(["response_id", "category"]).size().rename("n")
    keys = pd.MultiIndex.from_arrays([impressions["response_id"], impressions["ad_id"].map(category)])
    return pd.Series(per_category.reindex(keys).fillna(1).to_numpy() - 1, index=impressions.index).astype(
        "int64"
    )


def _quarantine_frame(impressions: pd.DataFrame, clicks: pd.DataFrame) -> pd.DataFrame:
    """Rejected events of both kinds in one table; free-form columns as text so any garbage fits."""
    frame = pd.concat([impressions.assign(kind="impression"), clicks.assign(kind="click")], ignore_index=True)
    frame = frame[["kind", "reason", *[c for c in frame.columns if c not in ("kind", "reason")]]]
    for column in frame.columns:
        if frame[column].dtype == object:
            frame[column] = frame[column].map(lambda v: None if pd.isna(v) else str(v))
    return frame


def _write_quarantine(directory: Path, window: str, frame: pd.DataFrame) -> Path | None:
    path = directory / f"{window}.parquet"
    if frame.empty:
        path.unlink(missing_ok=True)
        return None
    directory.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    logger.warning("window %s: %d events quarantined to %s", window, len(frame), path)
    return path


def _entity_upsert(
    current: pd.DataFrame, existing: pd.DataFrame, key: str, compare: Sequence[str], start: pd.Timestamp
) -> pd.DataFrame:
    """Rows of `current` whose content differs from what the store holds as of `start`."""
    as_of = existing[existing["event_timestamp"] <= start].sort_values("event_timestamp")
    latest = as_of.drop_duplicates(key, keep="last").set_index(key)[list(compare)]
    known = latest.reindex(current[key])
    same = np.logical_and.reduce(
        [known[c].to_numpy() == current[c].to_numpy() for c in compare], initial=True
    )
    return current[~same].drop_duplicates(key).reset_index(drop=True)


def _embed(frame: pd.DataFrame, text: str, column: str, encoder: TextEncoder) -> pd.DataFrame:
    vectors = encoder.encode(frame[text].tolist())
    return frame.assign(**{column: list(vectors)})


def upsert_entities(
    data: _Datasets,
    window: str,
    users: pd.DataFrame,
    ads: pd.DataFrame,
    start: pd.Timestamp,
    encoder: TextEncoder,
) -> None:
    """Write profile and ad rows that are new or changed as of `start` (only public columns)."""
    profiles = users[["user_id", "profile_text"]].astype(str)
    existing = data.read(USER_PROFILE, USER_PROFILE_SCHEMA, exclude=window)
    changed = _entity_upsert(profiles, existing, "user_id", ["profile_text"], start)
    changed = _embed(changed, "profile_text", "profile_embedding", encoder).assign(event_timestamp=start)
    data.write(USER_PROFILE, window, changed, USER_PROFILE_SCHEMA)

    catalogue = (
        ads[["ad_id", "text", "advertiser_id", "category"]].astype(str).rename(columns={"text": "ad_text"})
    )
    existing = data.read(AD, AD_SCHEMA, exclude=window)
    changed = _entity_upsert(catalogue, existing, "ad_id", ["ad_text", "advertiser_id", "category"], start)
    changed = _embed(changed, "ad_text", "ad_embedding", encoder).assign(event_timestamp=start)
    data.write(AD, window, changed, AD_SCHEMA)


def stats_schema(key: str, windows_days: Sequence[int]) -> pa.Schema:
    fields = [("event_timestamp", TIMESTAMP), (key, pa.string())]
    for days in windows_days:
        fields += [(f"impressions_{days}d", pa.int64()), (f"clicks_{days}d", pa.int64())]
        fields += [(f"ctr_{days}d", pa.float64())]
    return pa.schema(fields)


def click_stats(labeled: pd.DataFrame, key: str, end: pd.Timestamp, features: FeaturesConfig) -> pd.DataFrame:
    """Click history of every `key` seen before `end`, per window, as of `end`.

    Entities with no impression in a window get explicit zeros (and the prior CTR), so the
    online store never keeps a count that has aged out of the window.
    """
    history = labeled[labeled["event_timestamp"] < end]
    keys = pd.Index(sorted(history[key].unique()), name=key)
    out = pd.DataFrame({key: keys})
    for days in features.stats_windows_days:
        recent = history[history["event_timestamp"] >= end - pd.Timedelta(days=days)]
        grouped = recent.groupby(key)["clicked"]
        impressions = grouped.size().reindex(keys, fill_value=0).to_numpy("int64")
        clicks = grouped.sum().reindex(keys, fill_value=0).to_numpy("int64")
        out[f"impressions_{days}d"] = impressions
        out[f"clicks_{days}d"] = clicks
        out[f"ctr_{days}d"] = (clicks + features.ctr_prior_clicks) / (
            impressions + features.ctr_prior_impressions
        )
    out.insert(0, "event_timestamp", end)
    return out


def _materialize(
    store: FeatureStore, data: _Datasets, end: pd.Timestamp
) -> tuple[datetime | None, datetime | None]:
    """Load the online store up to `end`; returns the range covered ((None, None): nothing to do).

    Feast starts a view's first incremental run at now - ttl, which skips simulated or backfilled
    history, so a view never materialized is first loaded from the epoch. Views already loaded
    past `end` (an earlier window ingested again) are left alone, and so are views whose source
    has no file yet (dask cannot read a missing folder).
    """
    end_dt = end.to_pydatetime()
    views = [
        fv
        for fv in store.list_feature_views()
        if fv.online
        and isinstance(fv.batch_source, FileSource)
        and data.exists(Path(fv.batch_source.path).name)
        and (fv.most_recent_end_time is None or fv.most_recent_end_time < end_dt)
    ]
    if not views:
        return None, None
    fresh = [fv.name for fv in views if fv.most_recent_end_time is None]
    if fresh:
        store.materialize(EPOCH.to_pydatetime(), end_dt, feature_views=fresh)
    store.materialize_incremental(end_dt, feature_views=[fv.name for fv in views])
    starts = [
        EPOCH.to_pydatetime() if fv.most_recent_end_time is None else fv.most_recent_end_time for fv in views
    ]
    return min(starts), end_dt


@dataclass(frozen=True)
class WindowEvents:
    """A window's events after de-duplication and validation."""

    impressions_read: int = field(metadata=_help("Impressions of the window, plus any without timestamp."))
    clicks_read: int = field(metadata=_help("Clicks that arrived in the window, plus any without timestamp."))
    duplicates_dropped: int = field(metadata=_help("Exact copies of an event (same id, same content)."))
    accepted: pd.DataFrame = field(metadata={"help": "Valid impressions, with `n_same_category`."})
    clicks: pd.DataFrame = field(metadata={"help": "Clicks attributed to an accepted impression."})
    quarantine: pd.DataFrame = field(metadata={"help": "Rejected events of both kinds, with `reason`."})


def validate_window(
    impressions: pd.DataFrame,
    clicks: pd.DataFrame,
    users: pd.DataFrame,
    ads: pd.DataFrame,
    start: pd.Timestamp,
    end: pd.Timestamp,
) -> WindowEvents:
    """Split the window's events into usable and quarantined ones (no I/O).

    Args:
        impressions: Every impression of the feedback store (to find conflicts and late clicks).
        clicks: Every click of the feedback store.
        users: Known users (`user_id`).
        ads: Known ads (`ad_id`, `category`).
        start: First instant of the window.
        end: End of the window (exclusive).
    """
    all_impressions, all_clicks = _coerce_timestamps(impressions), _coerce_timestamps(clicks)
    impressions = all_impressions[_in_window(all_impressions, start, end)]
    clicks = all_clicks[_in_window(all_clicks, start, end)]
    n_read = len(impressions), len(clicks)
    impressions, clicks = impressions.drop_duplicates(), clicks.drop_duplicates()

    ad_ids = set(ads["ad_id"].astype(str))
    conflicting = _conflicting_ids(all_impressions[list(IMPRESSION_COLUMNS)].drop_duplicates())
    imp_reason = _impression_reasons(impressions, conflicting, ad_ids, set(users["user_id"].astype(str)))
    accepted, rejected = impressions[imp_reason.isna()], impressions[imp_reason.notna()]
    conflicting_clicks = _conflicting_ids(all_clicks[list(CLICK_COLUMNS)].drop_duplicates())
    clk_reason = _click_reasons(clicks, conflicting_clicks, accepted, rejected, all_impressions, start)

    # Every shown ad of a known category counts, even one rejected for another reason.
    shown = impressions[impressions["ad_id"].isin(ad_ids) & ~impressions["event_id"].isin(conflicting)]
    category = ads.drop_duplicates("ad_id").set_index("ad_id")["category"]
    n_same = _n_same_category(shown, category).reindex(accepted.index)
    return WindowEvents(
        impressions_read=n_read[0],
        clicks_read=n_read[1],
        duplicates_dropped=sum(n_read) - len(impressions) - len(clicks),
        accepted=accepted.assign(n_same_category=n_same),
        clicks=clicks[clk_reason.isna()],
        quarantine=_quarantine_frame(
            rejected.assign(reason=imp_reason.dropna()),
            clicks[clk_reason.notna()].assign(reason=clk_reason.dropna()),
        ),
    )


def label_impressions(events: WindowEvents) -> pd.DataFrame:
    """Accepted impressions in the labeled-impressions schema, `clicked` = 1 if a click was attributed."""
    accepted = events.accepted
    frame = accepted.assign(
        clicked=_keys(accepted).isin(_keys(events.clicks)).astype("int64"),
        position=pd.to_numeric(accepted["position"]).astype("int64"),
        n_ads=pd.to_numeric(accepted["n_ads"]).astype("int64"),
        bid=pd.to_numeric(accepted["bid"]).astype("float64"),
    )
    return frame[LABELED_SCHEMA.names].sort_values(["event_timestamp", "event_id"]).reset_index(drop=True)


def _write_labeled(
    data: _Datasets, window: str, labeled: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp
) -> tuple[int, int]:
    """Write the window's labeled impressions; returns (rows written, rows the store lacked).

    Impressions another (overlapping) window already labeled are not labeled twice. An impression
    is labeled by a window holding its timestamp, so only the files of windows that meet
    [start, end) are read: the cost is the window's, not the whole history's.
    """
    near = data.windows_overlapping(LABELED, start, end)
    before = set(data.read(LABELED, LABELED_SCHEMA, columns=["event_id"], windows=near)["event_id"])
    others = set(
        data.read(LABELED, LABELED_SCHEMA, exclude=window, columns=["event_id"], windows=near)["event_id"]
    )
    labeled = labeled[~labeled["event_id"].isin(others)]
    data.write(LABELED, window, labeled, LABELED_SCHEMA)
    return len(labeled), len(set(labeled["event_id"]) - before)


def _write_stats(data: _Datasets, window: str, end: pd.Timestamp) -> None:
    # The whole history (four narrow columns): every entity ever seen gets its row, zeros included.
    history = data.read(LABELED, LABELED_SCHEMA, columns=["event_timestamp", "user_id", "ad_id", "clicked"])
    for key, name in (("user_id", USER_STATS), ("ad_id", AD_STATS)):
        stats = click_stats(history, key, end, data.features)
        data.write(name, window, stats, stats_schema(key, data.features.stats_windows_days))


def ingest_window(
    store: FeatureStore,
    settings: Settings,
    feedback_dir: Path,
    users: pd.DataFrame,
    ads: pd.DataFrame,
    start: datetime | str,
    end: datetime | str,
    encoder: TextEncoder,
) -> IngestReport:
    """Ingest the impressions of [start, end) with the clicks that arrived before `end`.

    Args:
        store: The store from `open_store(settings)`.
        settings: Where the offline data and the quarantine live; windows and CTR priors.
        feedback_dir: The feedback store folder (`write_feedback` layout).
        users: The user table; only `user_id` and `profile_text` are read.
        ads: The ad table; only `ad_id`, `advertiser_id`, `category` and `text` are read.
        start: First instant of the window (inclusive).
        end: End of the window (exclusive); statistics are computed as of this instant.
        encoder: Text encoder phi, shared so every unique text is embedded once.
    """
    start, end = to_utc(start), to_utc(end)
    if not start < end:
        raise ValueError(f"window: start {start} must be before end {end}")
    window = window_name(start, end)
    data = _Datasets(absolute_features(settings.features, Path.cwd()))
    n_encoded = encoder.n_encoded

    events = validate_window(*read_feedback(feedback_dir), users, ads, start, end)
    n_labeled, n_new = _write_labeled(data, window, label_impressions(events), start, end)
    upsert_entities(data, window, users, ads, start, encoder)
    _write_stats(data, window, end)
    quarantine_path = _write_quarantine(settings.features.quarantine_dir, window, events.quarantine)
    materialized = _materialize(store, data, end)

    report = IngestReport(
        window=window,
        impressions_read=events.impressions_read,
        clicks_read=events.clicks_read,
        duplicates_dropped=events.duplicates_dropped,
        impressions_accepted=len(events.accepted),
        clicks_accepted=len(events.clicks),
        quarantined={
            str(k): int(v) for k, v in events.quarantine["reason"].value_counts().sort_index().items()
        },
        labeled_rows_new=n_new,
        labeled_rows_window=n_labeled,
        materialized_from=materialized[0],
        materialized_to=materialized[1],
        embeddings_computed=encoder.n_encoded - n_encoded,
        quarantine_path=quarantine_path,
    )
    logger.info("window %s ingested: %s", window, report)
    return report


def labeled_impressions(
    settings: Settings, start: datetime | str | None = None, end: datetime | str | None = None
) -> pd.DataFrame:
    """Labeled impressions with start <= event_timestamp < end (either bound optional), in time order."""
    frame = _Datasets(absolute_features(settings.features, Path.cwd())).read(LABELED, LABELED_SCHEMA)
    if start is not None:
        frame = frame[frame["event_timestamp"] >= to_utc(start)]
    if end is not None:
        frame = frame[frame["event_timestamp"] < to_utc(end)]
    return frame.sort_values(["event_timestamp", "event_id"]).reset_index(drop=True)
