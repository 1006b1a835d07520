"""Auction metrics with bootstrap confidence intervals over requests.

Per-request metrics (revenue, social welfare, ad load, fill rate, format-error rate) are means over
requests; social welfare is the advertisers' value of the clicks plus the user's utility of the
answer (`user_utility`, a request column when the simulator knows it). ITCTR is a ratio of sums
(clicks / ad impressions), bootstrapped as a ratio. Requests are the resampling unit because the
ads of one response interact (externalities).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from llm_auction.mechanism.payments import expected_payments

logger = logging.getLogger(__name__)

METRICS = ("revenue", "social_welfare", "itctr", "ad_load", "fill_rate", "format_error_rate")


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its bootstrap interval; NaN where the metric is undefined.

    `undefined_share` is the share of bootstrap resamples whose denominator summed to 0 (a ratio
    such as ITCTR over a resample without ads), which the interval leaves out.
    """

    mean: float
    ci: tuple[float, float]
    undefined_share: float = 0.0

    def to_dict(self) -> dict[str, float | list[float] | None]:
        def clean(x: float) -> float | None:
            return None if math.isnan(x) else round(float(x), 6)

        return {"mean": clean(self.mean), "ci": [clean(self.ci[0]), clean(self.ci[1])]}


def _check_finite(name: str, values: np.ndarray) -> None:
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise ValueError(
            f"bootstrap: {name} has {len(bad)} non-finite value(s) of {len(values)} "
            f"(first at positions {bad[:5].tolist()}: {values[bad[:5]].tolist()})"
        )


def bootstrap(
    numerator: np.ndarray,
    denominator: np.ndarray | None,
    n_boot: int,
    level: float,
    rng: np.random.Generator,
    max_undefined_share: float = 0.05,
) -> Estimate:
    """Percentile bootstrap of mean(numerator), or of sum(numerator) / sum(denominator).

    Non-finite inputs are an error (a NaN or inf would otherwise poison or silently thin the
    resamples). A resample whose denominator sums to 0 has no ratio: it is left out of the
    interval and counted in `Estimate.undefined_share`; when more than `max_undefined_share` of
    the resamples are undefined (a ratio over a handful of ads), the percentiles of the rest would
    be biased, so the interval is NaN and a warning is logged.
    """
    numerator = np.asarray(numerator, dtype=float)
    n = len(numerator)
    den = np.ones(n) if denominator is None else np.asarray(denominator, dtype=float)
    if den.shape != numerator.shape:
        raise ValueError(f"bootstrap: denominator shape {den.shape} != numerator shape {numerator.shape}")
    _check_finite("numerator", numerator)
    _check_finite("denominator", den)
    if n == 0:
        return Estimate(math.nan, (math.nan, math.nan))
    if den.sum() == 0:
        return Estimate(math.nan, (math.nan, math.nan), 1.0)
    point = numerator.sum() / den.sum()
    idx = rng.integers(0, n, size=(n_boot, n))
    sums = den[idx].sum(axis=1)
    defined = sums != 0
    samples = numerator[idx].sum(axis=1)[defined] / sums[defined]
    undefined = 1.0 - float(defined.mean())
    if undefined > max_undefined_share:
        logger.warning(
            "bootstrap: %.1f%% of %d resamples have a zero denominator (more than %.1f%%): "
            "interval left undefined",
            100 * undefined,
            n_boot,
            100 * max_undefined_share,
        )
        return Estimate(float(point), (math.nan, math.nan), undefined)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(samples, [alpha, 1 - alpha])
    return Estimate(float(point), (float(lo), float(hi)), undefined)


def per_request_outcomes(requests: pd.DataFrame, impressions: pd.DataFrame, clicks: str) -> pd.DataFrame:
    """Sum impressions up to one row per request: payments, welfare, clicks and ads shown."""
    shown = impressions.assign(
        payment=expected_payments(impressions["bid"], impressions[clicks]),
        welfare=impressions["value_per_click"] * impressions[clicks],
        clicks=impressions[clicks].astype(float),
    )
    sums = shown.groupby("request_id")[["payment", "welfare", "clicks"]].sum().astype(float)
    out = requests.set_index("request_id")[["n_ads", "n_format_errors"]].join(sums).fillna(0.0)
    if "user_utility" in requests:
        out["welfare"] += requests.set_index("request_id")["user_utility"].astype(float)
    return out


def auction_metrics(
    requests: pd.DataFrame,
    impressions: pd.DataFrame,
    n_boot: int,
    level: float,
    rng: np.random.Generator,
    clicks: str = "expected_ctr",
) -> dict[str, Estimate]:
    """All metrics of one rollout; `clicks` is `expected_ctr` (oracle) or `clicked` (realized)."""
    per = per_request_outcomes(requests, impressions, clicks)
    ads = per["n_ads"].to_numpy(float)
    return {
        "revenue": bootstrap(per["payment"].to_numpy(), None, n_boot, level, rng),
        "social_welfare": bootstrap(per["welfare"].to_numpy(), None, n_boot, level, rng),
        "itctr": bootstrap(per["clicks"].to_numpy(), ads, n_boot, level, rng),
        "ad_load": bootstrap(ads, None, n_boot, level, rng),
        "fill_rate": bootstrap((ads > 0).astype(float), None, n_boot, level, rng),
        "format_error_rate": bootstrap(
            (per["n_format_errors"].to_numpy() > 0).astype(float), None, n_boot, level, rng
        ),
    }
