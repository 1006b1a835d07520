"""The canary's decision procedure on logged data: outcomes, always-valid intervals, error rate, power.

Synthetic logs have the shape the collector exports (requests with arm and version, impressions
with bids, clicks by response and ad); users repeat, and the server's hash puts each in one arm.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from llm_auction.config import CanaryConfig
from llm_auction.evaluation.canary import (
    CHALLENGER,
    CHAMPION,
    canary_outcomes,
    cs_radius,
    decide,
    first_verdict,
    rho_squared,
    trajectory,
)
from llm_auction.serving.split import arm_for

CFG = CanaryConfig(min_requests_per_arm=200, max_requests=2000, plan_requests=2000)
MARGIN = 0.05
T0 = pd.Timestamp("2026-12-01", tz="UTC")


def synthetic_logs(
    n: int, ctr: dict[str, float], seed: int, n_users: int = 800, percent: float = 50
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """`n` requests from a pool of users (some return), split by the server's hash; each shows 0-3
    ads with log-normal bids, each clicked with probability `ctr[arm]` times the user's propensity."""
    rng = np.random.default_rng(seed)
    propensity = rng.lognormal(0.0, 0.5, n_users)
    user_arm = np.array([arm_for(f"u{u}", percent, salt=f"v{seed}") for u in range(n_users)])
    users = rng.integers(n_users, size=n)
    ids = np.array([f"r{i}" for i in range(n)])
    requests = pd.DataFrame(
        {
            "request_id": ids,
            "user_id": [f"u{u}" for u in users],
            "arm": user_arm[users],
            "policy_version": np.where(user_arm[users] == CHALLENGER, "2", "1"),
            "event_timestamp": T0 + pd.to_timedelta(np.arange(n), unit="s"),
        }
    )
    row = np.repeat(np.arange(n), rng.integers(4, size=n))  # one per impression
    impressions = pd.DataFrame(
        {
            "request_id": ids[row],
            "response_id": np.char.add("resp", row.astype(str)),
            "ad_id": np.char.add("a", rng.integers(50, size=len(row)).astype(str)),
            "bid": rng.lognormal(0.0, 0.6, len(row)),
        }
    ).drop_duplicates(["response_id", "ad_id"])
    u = users[row[impressions.index]]
    rate = np.where(user_arm[u] == CHALLENGER, ctr[CHALLENGER], ctr[CHAMPION]) * propensity[u]
    clicked = rng.random(len(impressions)) < np.minimum(1.0, rate)
    return requests, impressions, impressions.loc[clicked, ["response_id", "ad_id"]]


def test_outcomes_count_each_request_once_with_its_clicks_and_first_price_revenue():
    at = [T0 + pd.Timedelta(seconds=s) for s in range(5)]
    requests = pd.DataFrame(
        {
            "request_id": ["r0", "r1", "r2", "r3", "r1"],
            "user_id": ["u0", "u1", "u2", "u3", "u1"],
            "arm": [CHAMPION, CHALLENGER, CHAMPION, None, CHALLENGER],
            "policy_version": ["1", "2", "1", None, "2"],
            "event_timestamp": at,
        }
    )
    impressions = pd.DataFrame(
        {
            "request_id": ["r0", "r0", "r1", "r3"],
            "response_id": ["p0", "p0", "p1", "p3"],
            "ad_id": ["a", "b", "a", "a"],
            "bid": [2.0, 3.0, 1.5, 9.0],
        }
    )
    clicks = pd.DataFrame({"response_id": ["p0", "p0", "p3"], "ad_id": ["b", "b", "a"]})  # a repeated click
    out = canary_outcomes(requests, impressions, clicks).set_index("request_id")
    assert list(out.index) == ["r0", "r1", "r2"]  # no arm: outside the canary; r1 logged twice: once
    assert out.loc["r0", ["n_ads", "clicks", "revenue"]].tolist() == [2, 1, 3.0]  # pays its bid once
    assert out.loc["r1", ["n_ads", "clicks", "revenue"]].tolist() == [1, 0, 0.0]
    assert out.loc["r2", ["n_ads", "clicks", "revenue"]].tolist() == [0, 0, 0.0]  # no ads shown
    windowed = canary_outcomes(requests, impressions, clicks, start=at[1], end=at[2])
    assert windowed["request_id"].tolist() == ["r1"]
    nothing = canary_outcomes(requests.iloc[:0], impressions.iloc[:0], clicks.iloc[:0])  # a new store
    assert nothing.empty and decide(nothing, CFG, MARGIN, n_boot=10).decision == "continue"


def test_the_confidence_sequence_covers_at_every_look_where_a_fixed_interval_does_not():
    """Paths with a true difference of +0.05: the sequence misses it at some look of 40 in at most
    alpha of the paths; the fixed-n 95% interval, looked at as often, misses far more often."""
    rng = np.random.default_rng(7)
    rho2 = rho_squared(CFG.plan_requests, CFG.alpha)
    looks = np.arange(50, 2001, 50)
    seq_miss = fixed_miss = 0
    paths = 400
    for _ in range(paths):
        z = rng.random(2000) < 0.5
        y = rng.exponential(np.where(z, 0.55, 0.5))  # heavy-ish tail, like revenue
        seq = fixed = False
        for t in looks:
            zt, yt = z[:t], y[:t]
            p = zt.mean()
            mb, ma = yt[zt].mean(), yt[~zt].mean()
            sd = np.std(np.where(zt, (yt - mb) / p, -(yt - ma) / (1 - p)), ddof=1)
            err = abs(mb - ma - 0.05)
            seq |= err > cs_radius(sd, t, CFG.alpha, rho2)
            fixed |= err > 1.96 * sd / math.sqrt(t)
        seq_miss += seq
        fixed_miss += fixed
    assert seq_miss / paths <= CFG.alpha + 0.02, seq_miss
    assert fixed_miss / paths > 2 * CFG.alpha, fixed_miss  # why the canary needs the sequence
    assert cs_radius(1.0, 1, CFG.alpha, rho2) == math.inf  # one observation decides nothing


def _replay(ctr: dict[str, float], seeds: range) -> list[tuple[str, int]]:
    """The canary step's life on each seed's logs: a look every 100 requests, stop at a verdict."""
    out = []
    for seed in seeds:
        outcomes = canary_outcomes(*synthetic_logs(CFG.max_requests, ctr, seed))
        out.append(first_verdict(outcomes, CFG, MARGIN, look_every=100))
    return out


def test_an_a_a_canary_is_not_promoted_in_95_percent_of_seeded_runs():
    runs = _replay({CHAMPION: 0.12, CHALLENGER: 0.12}, range(300))
    decisions = pd.Series([d for d, _ in runs]).value_counts()
    promoted = decisions.get("promote", 0) / len(runs)
    assert promoted <= 0.05, decisions.to_dict()
    assert decisions.get("inconclusive", 0) / len(runs) >= 0.85, decisions.to_dict()


@pytest.mark.parametrize(
    ("ctr", "expected"),
    [
        ({CHAMPION: 0.10, CHALLENGER: 0.18}, "promote"),
        ({CHAMPION: 0.18, CHALLENGER: 0.10}, "rollback"),
    ],
)
def test_a_clear_difference_is_found_before_the_maximum(ctr, expected):
    runs = _replay(ctr, range(40))
    right = [n for d, n in runs if d == expected]
    assert len(right) / len(runs) >= 0.8, pd.Series([d for d, _ in runs]).value_counts().to_dict()
    assert np.median(right) < CFG.max_requests  # usually stops early


def test_no_verdict_before_the_minimum_and_inconclusive_at_the_maximum():
    outcomes = canary_outcomes(*synthetic_logs(CFG.max_requests, {CHAMPION: 0.05, CHALLENGER: 0.5}, 1))
    early = decide(outcomes.iloc[:300], CFG, MARGIN, n_boot=50)
    assert early.decision == "continue" and "min 200 each" in early.reason
    assert decide(outcomes.iloc[:300], CFG, MARGIN, n_boot=50, final=True).decision == "inconclusive"
    late = decide(outcomes, CFG, MARGIN, n_boot=50)
    assert late.decision == "promote" and late.revenue_difference.lo > 0
    arms = late.to_dict()["arms"]
    assert arms[CHALLENGER]["itctr"]["mean"] > 3 * arms[CHAMPION]["itctr"]["mean"]
    assert sum(a["requests"] for a in arms.values()) == CFG.max_requests


def test_itctr_worse_beyond_the_margin_rolls_back_even_with_more_revenue():
    """Twice the ads at a lower click rate: more revenue per request, but users click less."""
    requests, impressions, clicks = synthetic_logs(CFG.max_requests, {CHAMPION: 0.3, CHALLENGER: 0.2}, 3)
    challenger = set(requests.loc[requests["arm"] == CHALLENGER, "request_id"])
    doubled = impressions[impressions["request_id"].isin(challenger)].assign(ad_id=lambda f: f["ad_id"] + "x")
    rng = np.random.default_rng(3)
    extra = doubled[rng.random(len(doubled)) < 0.2][["response_id", "ad_id"]]
    outcomes = canary_outcomes(requests, pd.concat([impressions, doubled]), pd.concat([clicks, extra]))
    decision = decide(outcomes, CFG, MARGIN, n_boot=50)
    assert decision.revenue_difference.mean > 0
    assert decision.decision == "rollback" and "ITCTR" in decision.reason


def test_the_trajectory_replays_the_window_for_the_plot():
    outcomes = canary_outcomes(*synthetic_logs(1000, {CHAMPION: 0.1, CHALLENGER: 0.1}, 2))
    path = trajectory(outcomes, CFG, MARGIN, looks=10)
    assert path["requests"].tolist() == list(range(100, 1001, 100))
    assert (path["lo"] <= path["difference"]).all() and (path["difference"] <= path["hi"]).all()
    assert set(path["decision"]) <= {"continue"}  # never a verdict on A/A before max_requests here
