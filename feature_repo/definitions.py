"""Feast definitions of llm-auction: entities -> sources -> feature views -> feature service -> push.

Where the parquet files live and which click-history windows exist come from the project's
configuration, so that the library and the Feast CLI see the same objects:

- `llm_auction.features.store.open_store(settings)` runs this file with its own `settings`;
- the plain Feast CLI reads the profile (`LLM_AUCTION_PROFILE`, default `local`) and the
  `LLM_AUCTION__FEATURES__*` environment, e.g. from the project root:

      cd feature_repo && feast apply && feast feature-views list
      LLM_AUCTION_PROFILE=cluster feast -c feature_repo -f feature_repo/feature_store.cluster.yaml apply

A relative `features.data_dir` (the local default `data/features`) is taken from the project root,
the folder holding this repository, where `llm-auction` runs; the `local` feature_store.yaml keeps
its registry and online store in that same folder.
"""

from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Float64, Int64, String

from llm_auction.features.store import data_path, definitions_config

FEATURES = definitions_config(project_root=Path(__file__).resolve().parent.parent)
WINDOWS_DAYS = FEATURES.stats_windows_days
# A statistic older than its longest window describes a period that no longer matters.
STATS_TTL = timedelta(days=max(WINDOWS_DAYS))

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING, description="An end user.")
ad = Entity(name="ad", join_keys=["ad_id"], value_type=ValueType.STRING, description="One ad creative.")

# Rows are valid from `event_timestamp` (the start of the window that first saw the text).
user_profile_source = FileSource(
    name="user_profile_source",
    path=data_path(FEATURES, "user_profile"),
    timestamp_field="event_timestamp",
)
ad_source = FileSource(
    name="ad_source",
    path=data_path(FEATURES, "ad"),
    timestamp_field="event_timestamp",
)
# Statistics as of `event_timestamp` (a window's end), from impressions strictly before it.
user_stats_source = FileSource(
    name="user_stats_source",
    path=data_path(FEATURES, "user_stats"),
    timestamp_field="event_timestamp",
)
ad_stats_source = FileSource(
    name="ad_stats_source",
    path=data_path(FEATURES, "ad_stats"),
    timestamp_field="event_timestamp",
)
# Accepted impressions with their click label: the pCTR's entity frame and the push source's history.
labeled_impressions_source = FileSource(
    name="labeled_impressions_source",
    path=data_path(FEATURES, "labeled_impressions"),
    timestamp_field="event_timestamp",
)


def stats_schema(windows_days: tuple[int, ...]) -> list[Field]:
    """Impressions, clicks and prior-smoothed CTR per click-history window."""
    fields = []
    for days in windows_days:
        fields += [
            Field(name=f"impressions_{days}d", dtype=Int64),
            Field(name=f"clicks_{days}d", dtype=Int64),
            Field(name=f"ctr_{days}d", dtype=Float64),
        ]
    return fields


# ttl 0: a profile or an ad text stays valid until a newer row replaces it.
user_profile_fv = FeatureView(
    name="user_profile_fv",
    entities=[user],
    ttl=timedelta(0),
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="profile_text", dtype=String),
        Field(name="profile_embedding", dtype=Array(Float32)),
    ],
    source=user_profile_source,
    online=True,
)
user_stats_fv = FeatureView(
    name="user_stats_fv",
    entities=[user],
    ttl=STATS_TTL,
    schema=[Field(name="user_id", dtype=String), *stats_schema(WINDOWS_DAYS)],
    source=user_stats_source,
    online=True,
)
ad_fv = FeatureView(
    name="ad_fv",
    entities=[ad],
    ttl=timedelta(0),
    schema=[
        Field(name="ad_id", dtype=String),
        Field(name="ad_text", dtype=String),
        Field(name="ad_embedding", dtype=Array(Float32)),
        Field(name="advertiser_id", dtype=String),
        Field(name="category", dtype=String),
    ],
    source=ad_source,
    online=True,
)
ad_stats_fv = FeatureView(
    name="ad_stats_fv",
    entities=[ad],
    ttl=STATS_TTL,
    schema=[Field(name="ad_id", dtype=String), *stats_schema(WINDOWS_DAYS)],
    source=ad_stats_source,
    online=True,
)

# Everything the pCTR reads besides the impression itself (query, response, position, n_ads,
# n_same_category, bid come with the labeled impression). Texts stay out: their embeddings suffice.
pctr_v1 = FeatureService(
    name="pctr_v1",
    features=[
        user_profile_fv[["profile_text", "profile_embedding"]],
        user_stats_fv,
        ad_fv[["ad_text", "ad_embedding", "advertiser_id", "category"]],
        ad_stats_fv,
    ],
    description="Features of the pCTR reward model psi (join on user_id, ad_id at the impression time).",
)

# The feedback collector pushes labeled impressions as they happen (an impression with clicked=0,
# again with clicked=1 when its click arrives); offline they are the labeled-impressions dataset.
feedback_push = PushSource(name="feedback_push", batch_source=labeled_impressions_source)

# Feast routes a push only to feature views reading the push source: the latest feedback of a user
# on an ad (frequency capping, debugging). Not in pctr_v1: at an impression's own timestamp it
# would hand the model that impression's label.
feedback_fv = FeatureView(
    name="feedback_fv",
    entities=[user, ad],
    ttl=STATS_TTL,
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="ad_id", dtype=String),
        Field(name="position", dtype=Int64),
        Field(name="n_ads", dtype=Int64),
        Field(name="bid", dtype=Float64),
        Field(name="clicked", dtype=Int64),
    ],
    source=feedback_push,
    online=True,
)
