"""The canary's verdict from live traffic: per-arm online metrics and a sequential decision.

The server answers each user from one arm (`champion` or `challenger`, a stable hash of the
user); the request log records the arm and the policy version of every answer, impressions and
clicks follow by `response_id`. From those public logs alone:

- per arm: requests, impressions, clicks, realised revenue per request (first-price pay-per-click:
  the bid of every clicked ad, `mechanism.payments`), ITCTR (clicks / ad impressions) and ad load,
  each with a bootstrap interval (`mechanism.metrics`);
- the decision, on two **asymptotic confidence sequences** (Waudby-Smith, Arbour, Sinha, Kennedy
  and Ramdas, "Time-uniform central limit theory and asymptotic confidence sequences", Annals of
  Statistics 2024, arXiv:2103.06476, Theorem 2.2: Robbins' normal-mixture boundary with the
  variance estimated), for the difference in revenue per request (challenger - champion) and for
  ITCTR's non-inferiority `itctr_challenger - (1 - margin) * itctr_champion`. Each is applied to
  the estimator's influence terms (difference of arm means: the Hajek form of their randomized-
  experiment estimator), so its coverage holds at every look at once: the canary may be checked
  after every request without inflating the error rate, which a fixed-n interval would not allow.

Promote when revenue's lower bound is above 0 and ITCTR's non-inferiority bound is above 0; roll
back when revenue's upper bound is below 0 or ITCTR is inferior beyond the margin; before
`min_requests_per_arm` nothing is decided; at `max_requests` without a verdict the canary ends
inconclusive (the champion stays). The unit is the request; a user's requests share an arm, so
heavy users make the intervals somewhat optimistic (the A/A test measures the error rate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

from llm_auction.config import CanaryConfig
from llm_auction.mechanism.metrics import Estimate, bootstrap
from llm_auction.mechanism.payments import expected_payments

CHAMPION, CHALLENGER = "champion", "challenger"
ARMS = (CHAMPION, CHALLENGER)
Verdict = Literal["promote", "rollback", "inconclusive", "continue"]
OUTCOME_COLUMNS = (
    "request_id", "user_id", "arm", "policy_version", "event_timestamp", "n_ads", "clicks", "revenue",
)  # fmt: skip


def canary_outcomes(
    requests: pd.DataFrame,
    impressions: pd.DataFrame,
    clicks: pd.DataFrame,
    start: pd.Timestamp | None = None,
    end: pd.Timestamp | None = None,
) -> pd.DataFrame:
    """One row per request answered by an arm in [start, end), in arrival order, with what it earned.

    `requests` is the request log with its `arm` and `policy_version` columns (requests served
    outside a canary have no arm and are left out); a request without impressions counts with 0
    ads, 0 clicks and 0 revenue. A click counts once per (response, ad).
    """
    log = requests.dropna(subset=["arm"])
    log = log[log["arm"].isin(ARMS)].assign(
        event_timestamp=lambda f: pd.to_datetime(f["event_timestamp"], utc=True)
    )
    if start is not None:
        log = log[log["event_timestamp"] >= start]
    if end is not None:
        log = log[log["event_timestamp"] < end]
    log = log.astype({"request_id": str}).sort_values(["event_timestamp", "request_id"])
    log = log.drop_duplicates("request_id")
    shown = impressions.drop_duplicates(["response_id", "ad_id"])
    clicked = clicks.drop_duplicates(["response_id", "ad_id"])[["response_id", "ad_id"]].assign(click=1.0)
    shown = shown.merge(clicked, on=["response_id", "ad_id"], how="left").fillna({"click": 0.0})
    shown = shown.assign(payment=expected_payments(shown["bid"], shown["click"]))
    per = (
        shown.astype({"request_id": str})
        .groupby("request_id")
        .agg(n_ads=("ad_id", "size"), clicks=("click", "sum"), revenue=("payment", "sum"))
    )
    out = log.join(per, on="request_id").fillna({"n_ads": 0, "clicks": 0.0, "revenue": 0.0})
    out["policy_version"] = out["policy_version"].astype(str)
    return out[list(OUTCOME_COLUMNS)].reset_index(drop=True)


@dataclass(frozen=True)
class ArmMetrics:
    """What one arm did: volumes, and the online metrics with their (fixed-n) bootstrap intervals."""

    arm: str
    policy_versions: list[str]
    requests: int
    impressions: int
    clicks: int
    revenue: Estimate
    itctr: Estimate
    ad_load: Estimate

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if not isinstance(getattr(self, k), Estimate)},
            **{k: getattr(self, k).to_dict() for k in ("revenue", "itctr", "ad_load")},
        }


def arm_metrics(outcomes: pd.DataFrame, n_boot: int, level: float, seed: int = 0) -> dict[str, ArmMetrics]:
    """Per-arm metrics of `canary_outcomes`; an arm without requests has undefined metrics."""
    rng = np.random.default_rng(seed)
    out = {}
    for arm in ARMS:
        rows = outcomes[outcomes["arm"] == arm]
        ads = rows["n_ads"].to_numpy(float)
        out[arm] = ArmMetrics(
            arm,
            sorted(rows["policy_version"].unique().tolist()),
            len(rows),
            int(ads.sum()),
            int(rows["clicks"].sum()),
            bootstrap(rows["revenue"].to_numpy(float), None, n_boot, level, rng),
            bootstrap(rows["clicks"].to_numpy(float), ads, n_boot, level, rng),
            bootstrap(ads, None, n_boot, level, rng),
        )
    return out


def rho_squared(plan_requests: int, alpha: float) -> float:
    """The mixture's rho^2 that makes the sequence tightest near `plan_requests` (any rho is valid)."""
    return (-2 * math.log(alpha) + math.log(-2 * math.log(alpha) + 1)) / plan_requests


def cs_radius(sd: float, t: int, alpha: float, rho2: float) -> float:
    """Half-width at sample size t of the two-sided (1 - alpha) asymptotic confidence sequence.

    Robbins' normal mixture: P(exists t: |S_t| / t >= this) <= alpha, with S_t the sum of t
    centred terms of standard deviation `sd` (Waudby-Smith et al. 2024, Theorem 2.2).
    """
    if t < 2 or not math.isfinite(sd):
        return math.inf
    return sd * math.sqrt(2 * (t * rho2 + 1) / (t * t * rho2) * math.log(math.sqrt(t * rho2 + 1) / alpha))


@dataclass(frozen=True)
class Interval:
    """An estimate and its confidence-sequence interval at the current look."""

    mean: float
    lo: float
    hi: float

    def to_dict(self) -> dict[str, float | None]:
        return {k: None if not math.isfinite(v) else round(v, 6) for k, v in asdict(self).items()}


UNDEFINED = Interval(math.nan, -math.inf, math.inf)


def _sequence(estimate: float, influence: np.ndarray, cfg: CanaryConfig) -> Interval:
    if not math.isfinite(estimate):
        return UNDEFINED
    radius = cs_radius(float(np.std(influence, ddof=1)), len(influence), cfg.alpha, _rho2(cfg))
    return Interval(estimate, estimate - radius, estimate + radius)


def _rho2(cfg: CanaryConfig) -> float:
    return rho_squared(cfg.plan_requests, cfg.alpha)


def revenue_difference(outcomes: pd.DataFrame, cfg: CanaryConfig) -> Interval:
    """Revenue per request, challenger - champion, on its confidence sequence."""
    z = (outcomes["arm"] == CHALLENGER).to_numpy()
    y = outcomes["revenue"].to_numpy(float)
    p = z.mean()
    if not 0 < p < 1:
        return UNDEFINED
    mean_b, mean_a = y[z].mean(), y[~z].mean()
    influence = np.where(z, (y - mean_b) / p, -(y - mean_a) / (1 - p))
    return _sequence(mean_b - mean_a, influence, cfg)


def itctr_noninferiority(outcomes: pd.DataFrame, margin: float, cfg: CanaryConfig) -> Interval:
    """`itctr_challenger - (1 - margin) * itctr_champion` on its confidence sequence (delta method).

    Above 0: the challenger's ITCTR is at most `margin` (a share) below the champion's. A champion
    that showed no ads sets no bar (0); a challenger that showed none is undefined.
    """
    z = (outcomes["arm"] == CHALLENGER).to_numpy()
    c, n = outcomes["clicks"].to_numpy(float), outcomes["n_ads"].to_numpy(float)
    p = z.mean()
    if not 0 < p < 1 or n[z].sum() == 0:
        return UNDEFINED
    theta_b = c[z].sum() / n[z].sum()
    term_b = (c - theta_b * n) / (p * n[z].mean())
    if n[~z].sum() == 0:
        influence = np.where(z, term_b, 0.0)
        return _sequence(theta_b, influence, cfg)
    theta_a = c[~z].sum() / n[~z].sum()
    term_a = (1 - margin) * (c - theta_a * n) / ((1 - p) * n[~z].mean())
    influence = np.where(z, term_b, -term_a)
    return _sequence(theta_b - (1 - margin) * theta_a, influence, cfg)


@dataclass(frozen=True)
class CanaryDecision:
    """The verdict at one look, and the numbers behind it."""

    decision: Verdict
    reason: str
    requests: int
    revenue_difference: Interval
    itctr_noninferiority: Interval
    arms: Mapping[str, ArmMetrics]
    alpha: float
    itctr_margin: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision,
            "reason": self.reason,
            "requests": self.requests,
            "revenue_difference": self.revenue_difference.to_dict(),
            "itctr_noninferiority": self.itctr_noninferiority.to_dict(),
            "arms": {arm: m.to_dict() for arm, m in self.arms.items()},
            "alpha": self.alpha,
            "itctr_margin": self.itctr_margin,
            "test": "asymptotic confidence sequences (Waudby-Smith et al. 2024), valid at every look",
        }


def card_section(decision: CanaryDecision, verdict: str, reason: str, champion: str, challenger: str) -> str:
    """The canary's part of the version's review card (markdown): per-arm metrics and the verdict."""

    def cell(e: Estimate, digits: int = 4) -> str:
        if not math.isfinite(e.mean):
            return "-"
        return f"{e.mean:.{digits}f} [{e.ci[0]:.{digits}f}, {e.ci[1]:.{digits}f}]"

    def band(s: Interval) -> str:
        return "undefined" if not math.isfinite(s.mean) else f"{s.mean:+.4f} [{s.lo:+.4f}, {s.hi:+.4f}]"

    rows = [
        f"| {arm} | v{version} | {m.requests} | {m.impressions} | {m.clicks} | {cell(m.revenue)} | "
        f"{cell(m.itctr)} | {cell(m.ad_load, 2)} |"
        for arm, version in ((CHAMPION, champion), (CHALLENGER, challenger))
        for m in [decision.arms[arm]]
    ]
    return "\n".join(
        [
            f"## Canary: {verdict}",
            "",
            reason,
            "",
            "| arm | version | requests | impressions | clicks | revenue / request | ITCTR | ad load |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            f"Revenue per request, challenger - champion: {band(decision.revenue_difference)}; ITCTR "
            f"non-inferiority (margin {decision.itctr_margin:.0%}): {band(decision.itctr_noninferiority)}. "
            f"Differences on asymptotic confidence sequences at alpha {decision.alpha} (valid at every "
            "look); per-arm intervals are fixed-n bootstrap intervals.",
        ]
    )


def verdict(
    outcomes: pd.DataFrame, cfg: CanaryConfig, itctr_margin: float, final: bool = False
) -> tuple[Verdict, str, Interval, Interval]:
    """The decision rule alone (cheap: no bootstrap), so a replay can look after every batch.

    `final`: no more traffic will come (the caller's window ends); otherwise `max_requests` ends it.
    """
    counts = outcomes["arm"].value_counts()
    n_a, n_b = int(counts.get(CHAMPION, 0)), int(counts.get(CHALLENGER, 0))
    revenue = revenue_difference(outcomes, cfg)
    itctr = itctr_noninferiority(outcomes, itctr_margin, cfg)
    ended = final or len(outcomes) >= cfg.max_requests

    def band(s: Interval) -> str:
        return f"{s.mean:+.4f} [{s.lo:+.4f}, {s.hi:+.4f}]"

    if min(n_a, n_b) < cfg.min_requests_per_arm:
        if ended:
            return "inconclusive", f"too few requests: {n_a} champion, {n_b} challenger", revenue, itctr
        return (
            "continue",
            f"collecting: {n_a} champion, {n_b} challenger (min {cfg.min_requests_per_arm} each)",
            revenue,
            itctr,
        )
    if revenue.hi < 0:
        return "rollback", f"revenue per request lower: {band(revenue)}", revenue, itctr
    if itctr.hi < 0:
        return "rollback", f"ITCTR below the {itctr_margin:.0%} margin: {band(itctr)}", revenue, itctr
    if revenue.lo > 0 and itctr.lo > 0:
        return "promote", f"revenue per request higher: {band(revenue)}; ITCTR non-inferior", revenue, itctr
    why = f"no verdict: revenue {band(revenue)}, ITCTR margin {band(itctr)}"
    if ended:
        return "inconclusive", f"{why} after {len(outcomes)} requests", revenue, itctr
    return "continue", why, revenue, itctr


def decide(
    outcomes: pd.DataFrame,
    cfg: CanaryConfig,
    itctr_margin: float,
    n_boot: int = 1000,
    level: float = 0.95,
    final: bool = False,
) -> CanaryDecision:
    """The canary's verdict on everything observed so far, with each arm's metrics."""
    decision, reason, revenue, itctr = verdict(outcomes, cfg, itctr_margin, final)
    arms = arm_metrics(outcomes, n_boot, level)
    return CanaryDecision(decision, reason, len(outcomes), revenue, itctr, arms, cfg.alpha, itctr_margin)


def trajectory(
    outcomes: pd.DataFrame, cfg: CanaryConfig, itctr_margin: float, looks: int = 40
) -> pd.DataFrame:
    """The experiment as it unfolded: each arm's revenue per request and the difference's sequence
    at `looks` evenly spaced points of the window (for the report's plot and for replays).
    """
    rows = []
    for end in np.unique(np.linspace(0, len(outcomes), looks + 1).astype(int)[1:]):
        prefix = outcomes.iloc[:end]
        decision, _, revenue, itctr = verdict(prefix, cfg, itctr_margin)
        means = prefix.groupby("arm")["revenue"].mean()
        rows.append(
            {
                "requests": int(end),
                **{f"{arm}_revenue": float(means.get(arm, math.nan)) for arm in ARMS},
                "difference": revenue.mean,
                "lo": revenue.lo,
                "hi": revenue.hi,
                "itctr_lo": itctr.lo,
                "decision": decision,
            }
        )
    return pd.DataFrame(rows)


def first_verdict(
    outcomes: pd.DataFrame, cfg: CanaryConfig, itctr_margin: float, look_every: int
) -> tuple[Verdict, int]:
    """Replay the sequential procedure: look after every `look_every` requests, stop at the first
    verdict; (verdict, requests used). What the canary step does over the life of a canary.
    """
    for end in range(look_every, len(outcomes) + look_every, look_every):
        end = min(end, len(outcomes))
        decision, *_ = verdict(outcomes.iloc[:end], cfg, itctr_margin, final=end == len(outcomes))
        if decision != "continue":
            return decision, end
    return "inconclusive", len(outcomes)
