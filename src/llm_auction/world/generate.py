"""The seeded synthetic world: advertisers, ads, users, queries and a stream of auction requests.

Ground truth that users react to but the reward model never sees (ad quality, topics, user
interests as numbers, advertisers' private values) lives in these tables; the simulator reads it,
the auction request carries only what a real system would see (texts and bids).

Bids change per auction: an advertiser's value of a click in one auction is its mean value per
click times its campaign multiplier at that hour (`1 + a sin(2 pi (hour / 24 + phase))`, pacing
over the day) times mean-one lognormal noise (`world.bid_noise`), and its bid is its strategy
(truthful, shading, inflating) applied to that value (the requests' `values` and `bids`; `base_bid`
is the strategy applied to the mean value). An allocation rule has to read the bids in the
prompt: remembering an ad's usual bid is not enough.
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llm_auction.config import WorldConfig
from llm_auction.contracts import AdCandidate, AuctionRequest
from llm_auction.text import bank

TABLES = ("advertisers", "ads", "users", "queries", "requests")
CATEGORY_NAMES: tuple[str, ...] = tuple(c.name for c in bank.CATEGORIES)


@dataclass(frozen=True)
class World:
    """The five tables of one world, with lookups the simulator and the baselines need."""

    advertisers: pd.DataFrame
    ads: pd.DataFrame
    users: pd.DataFrame
    queries: pd.DataFrame
    requests: pd.DataFrame
    seed: int

    def save(self, out: Path) -> list[Path]:
        """Write each table as parquet; same world, byte-identical files."""
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for name in TABLES:
            table = pa.Table.from_pandas(getattr(self, name), preserve_index=False)
            path = out / f"{name}.parquet"
            pq.write_table(table, path, compression="zstd")
            paths.append(path)
        manifest = {"seed": self.seed, "tables": {n: len(getattr(self, n)) for n in TABLES}}
        (out / "world.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        return paths

    @classmethod
    def load(cls, directory: Path) -> World:
        manifest_path = directory / "world.json"
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{directory}: no world.json; generate a world there first")
        seed = json.loads(manifest_path.read_text())["seed"]
        tables = {n: pq.read_table(directory / f"{n}.parquet").to_pandas() for n in TABLES}
        return cls(seed=seed, **tables)

    @functools.cached_property
    def _ad_fields(self) -> dict[str, dict[str, str]]:
        """Each ad's public fields, built once (requests of a world share its few hundred ads)."""
        columns = ["ad_id", "advertiser_id", "text"]
        return {r["ad_id"]: r for r in self.ads[columns].to_dict("records")}

    def auction_requests(self, limit: int | None = None, offset: int = 0) -> list[AuctionRequest]:
        """Requests of the stream as the public contract (texts and this auction's bids only)."""
        rows = self.requests.iloc[offset : None if limit is None else offset + limit]
        ads = self._ad_fields
        out = []
        for row in rows.itertuples(index=False):
            candidates = tuple(
                AdCandidate(**ads[ad_id], bid=float(bid))
                for ad_id, bid in zip(row.ad_ids, row.bids, strict=True)
            )
            out.append(
                AuctionRequest(
                    request_id=row.request_id, user_id=row.user_id, query=row.query, ads=candidates
                )
            )
        return out


def _brand_names(rng: np.random.Generator, n: int) -> list[str]:
    first, second = bank.BRAND_PARTS
    pairs = [a + b for a, b in itertools.product(first, second)]
    order = rng.permutation(len(pairs))
    return [pairs[order[i % len(pairs)]] + ("" if i < len(pairs) else str(i // len(pairs))) for i in range(n)]


def _strategy_factors(cfg: WorldConfig) -> dict[str, float]:
    return {"truthful": 1.0, "shade": 1.0 - cfg.bid_factor, "inflate": 1.0 + cfg.bid_factor}


def _bid(values: np.ndarray, factors: np.ndarray) -> np.ndarray:
    return np.maximum(np.round(values * factors, 2), 0.01)


def _bids(values: np.ndarray, cfg: WorldConfig, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    strategies = _strategy_factors(cfg)
    if cfg.bid_strategy == "mixed":
        chosen = [str(s) for s in rng.choice(list(strategies), size=len(values))]
    else:
        chosen = [cfg.bid_strategy] * len(values)
    return _bid(values, np.array([strategies[s] for s in chosen])), chosen


def _advertisers(cfg: WorldConfig, rng: np.random.Generator) -> pd.DataFrame:
    n = cfg.n_advertisers
    values = np.maximum(np.round(rng.lognormal(cfg.value_log_mean, cfg.value_log_sigma, n), 2), 0.05)
    bids, strategies = _bids(values, cfg, rng)
    return pd.DataFrame(
        {
            "advertiser_id": [f"adv{i:04d}" for i in range(n)],
            "name": _brand_names(rng, n),
            "category": [CATEGORY_NAMES[c] for c in rng.integers(0, len(CATEGORY_NAMES), n)],
            "value_per_click": values,
            "bid_strategy": strategies,
            "base_bid": bids,
            "campaign_amplitude": rng.uniform(0.0, cfg.campaign_amplitude, n),
            "campaign_phase": rng.uniform(0.0, 1.0, n),
        }
    )


def _ads(advertisers: pd.DataFrame, cfg: WorldConfig, rng: np.random.Generator) -> pd.DataFrame:
    by_name = {c.name: c for c in bank.CATEGORIES}
    rows = []
    for adv in advertisers.itertuples(index=False):
        category = by_name[adv.category]
        for j in range(cfg.ads_per_advertiser):
            topic = category.topics[rng.integers(len(category.topics))]
            product = topic.products[rng.integers(len(topic.products))]
            template = bank.AD_TEMPLATES[rng.integers(len(bank.AD_TEMPLATES))]
            adjective = bank.ADJECTIVES[rng.integers(len(bank.ADJECTIVES))]
            rows.append(
                {
                    "ad_id": f"{adv.advertiser_id}-{j}",
                    "advertiser_id": adv.advertiser_id,
                    "category": adv.category,
                    "topic": topic.name,
                    "text": template.format(brand=adv.name, product=product, adjective=adjective),
                    "quality": float(rng.beta(2.0, 2.0)),
                    "value_per_click": float(adv.value_per_click),
                    "base_bid": float(adv.base_bid),
                }
            )
    return pd.DataFrame(rows)


def _users(cfg: WorldConfig, rng: np.random.Generator) -> pd.DataFrame:
    n_cat = len(bank.CATEGORIES)
    interests = rng.dirichlet(np.full(n_cat, cfg.interest_concentration), size=cfg.n_users)
    rows = []
    for i, weights in enumerate(interests):
        first, second = np.argsort(-weights)[:2]
        template = bank.PROFILE_TEMPLATES[rng.integers(len(bank.PROFILE_TEMPLATES))]
        text = template.format(
            age=int(rng.integers(18, 70)),
            first=bank.CATEGORIES[first].interest,
            second=bank.CATEGORIES[second].interest,
        )
        rows.append(
            {
                "user_id": f"u{i:05d}",
                "profile_text": text,
                "interests": [float(w) for w in weights],
                "top_category": CATEGORY_NAMES[first],
            }
        )
    return pd.DataFrame(rows)


def _all_queries() -> Iterator[dict[str, str]]:
    for category in bank.CATEGORIES:
        for topic in category.topics:
            for intent, templates in bank.QUERY_TEMPLATES.items():
                for template in templates:
                    fills = topic.products if "{product}" in template else (topic.name,)
                    for fill in fills:
                        yield {
                            "category": category.name,
                            "topic": topic.name,
                            "intent": intent,
                            "text": template.format(product=fill, topic=fill),
                        }


def _queries(cfg: WorldConfig, rng: np.random.Generator) -> pd.DataFrame:
    """Distinct query texts (the text identifies the query), at most as many as templates allow."""
    pool = list({q["text"]: q for q in _all_queries()}.values())
    chosen = sorted(rng.choice(len(pool), size=min(cfg.n_queries, len(pool)), replace=False))
    frame = pd.DataFrame([pool[i] for i in chosen])
    frame.insert(0, "query_id", [f"q{i:04d}" for i in range(len(frame))])
    return frame


def _requests(
    users: pd.DataFrame, queries: pd.DataFrame, ads: pd.DataFrame, cfg: WorldConfig, rng: np.random.Generator
) -> pd.DataFrame:
    """Users ask mostly about what interests them; retrieval returns K ads, mostly on-category."""
    n_cat = len(CATEGORY_NAMES)
    queries_by_cat = [np.flatnonzero(queries["category"].to_numpy() == c) for c in CATEGORY_NAMES]
    ads_by_cat = [np.flatnonzero(ads["category"].to_numpy() == c) for c in CATEGORY_NAMES]
    interests = np.stack(users["interests"].to_numpy())
    k = min(cfg.k_candidates, len(ads))
    start = pd.Timestamp(cfg.start_time)
    offsets = np.cumsum(rng.exponential(cfg.mean_interarrival_s, cfg.n_requests))
    rows = []
    for r in range(cfg.n_requests):
        u = int(rng.integers(len(users)))
        cat = int(rng.choice(n_cat, p=interests[u])) if rng.random() < 0.8 else int(rng.integers(n_cat))
        if len(queries_by_cat[cat]) == 0:
            cat = int(queries["category"].map(CATEGORY_NAMES.index).iloc[rng.integers(len(queries))])
        q = int(rng.choice(queries_by_cat[cat]))
        chosen: list[int] = []
        while len(chosen) < k:
            on_topic = [a for a in ads_by_cat[cat] if a not in chosen]
            pool = on_topic if on_topic and rng.random() >= cfg.retrieval_noise else None
            if pool is None:
                pool = [a for a in range(len(ads)) if a not in chosen]
            chosen.append(int(rng.choice(pool)))
        rows.append(
            {
                "request_id": f"r{r:07d}",
                "timestamp": start + pd.Timedelta(seconds=float(offsets[r])),
                "user_id": users["user_id"].iat[u],
                "query_id": queries["query_id"].iat[q],
                "query": queries["text"].iat[q],
                "ad_ids": [str(ads["ad_id"].iat[a]) for a in chosen],
            }
        )
    frame = pd.DataFrame(rows)
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True).astype("datetime64[us, UTC]")
    return frame


def _auction_values_and_bids(
    requests: pd.DataFrame,
    ads: pd.DataFrame,
    advertisers: pd.DataFrame,
    cfg: WorldConfig,
    rng: np.random.Generator,
) -> tuple[list[list[float]], list[list[float]]]:
    """Each request's value per click of each candidate (value x campaign multiplier x noise) and
    the advertiser's bid on it (its strategy applied to that value).
    """
    campaign = advertisers.set_index("advertiser_id")[
        ["campaign_amplitude", "campaign_phase", "bid_strategy"]
    ]
    by_ad = ads.set_index("ad_id")[["advertiser_id", "value_per_click"]].join(campaign, on="advertiser_id")
    hours = (requests["timestamp"].dt.hour + requests["timestamp"].dt.minute / 60).to_numpy(float)
    counts = requests["ad_ids"].map(len).to_numpy()
    rows = by_ad.loc[[a for ids in requests["ad_ids"] for a in ids]]
    pacing = 1 + rows["campaign_amplitude"].to_numpy() * np.sin(
        2 * np.pi * (np.repeat(hours, counts) / 24 + rows["campaign_phase"].to_numpy())
    )
    noise = np.exp(cfg.bid_noise * rng.standard_normal(len(rows)) - cfg.bid_noise**2 / 2)
    values = np.maximum(np.round(rows["value_per_click"].to_numpy() * pacing * noise, 2), 0.01)
    factors = rows["bid_strategy"].map(_strategy_factors(cfg)).to_numpy(float)
    bids = _bid(values, factors)
    cuts = np.cumsum(counts)[:-1]
    return (
        [[float(v) for v in chunk] for chunk in np.split(values, cuts)],
        [[float(b) for b in chunk] for chunk in np.split(bids, cuts)],
    )


def generate_world(cfg: WorldConfig, seed: int) -> World:
    """Build a world; every table has its own random stream so that sizes change one table only."""
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(6)]
    advertisers = _advertisers(cfg, streams[0])
    ads = _ads(advertisers, cfg, streams[1])
    users = _users(cfg, streams[2])
    queries = _queries(cfg, streams[3])
    requests = _requests(users, queries, ads, cfg, streams[4])
    requests["values"], requests["bids"] = _auction_values_and_bids(
        requests, ads, advertisers, cfg, streams[5]
    )
    if cfg.candidate_order == "bid":
        requests = _by_bid(requests)
    return World(advertisers, ads, users, queries, requests, seed)


def _by_bid(requests: pd.DataFrame) -> pd.DataFrame:
    """Each request's candidates (ids, values, bids) reordered by bid, highest first (stable on ties)."""
    orders = [np.argsort(-np.asarray(bids), kind="stable") for bids in requests["bids"]]
    return requests.assign(
        **{
            column: [[row[i] for i in order] for row, order in zip(requests[column], orders, strict=True)]
            for column in ("ad_ids", "values", "bids")
        }
    )
