"""Incentive audits of an allocation rule: allocation monotonicity and individual rationality.

First-price pay-per-click is sound when the allocation is monotone: raising one's own bid never
lowers one's expected clicks (LLM-Auction, Sec. 5). The audit measures it for any `Allocator`,
deterministic or sampled: every bid level of one advertiser is allocated with the same random
stream (common random numbers), so a bid-blind sampled rule shows no spurious violations, and a
sampled rule's drop must exceed `z` standard errors to count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from llm_auction.contracts import Allocator, AuctionRequest, ClickModel, SampledAllocator
from llm_auction.mechanism.grammar import parse_response
from llm_auction.mechanism.metrics import Estimate, bootstrap
from llm_auction.mechanism.payments import payment_per_click as first_price


@dataclass(frozen=True)
class MonotonicityViolation:
    request_id: str
    ad_index: int
    factors: tuple[float, float]
    clicks: tuple[float, float]


@dataclass(frozen=True)
class MonotonicityReport:
    n_checks: int
    violations: list[MonotonicityViolation] = field(default_factory=list)
    detectable_drop: float = float("nan")
    """The audit's power: median over checks (of candidates shown at either level) of the smallest
    fall in expected clicks it flags at this sample size; smaller falls pass unseen."""
    bid_doubling: Estimate | None = None
    """Change in a candidate's insertion probability when its bid doubles (factors 1 and 2), mean over
    requests of their candidates' changes, with its bootstrap interval over requests."""

    @property
    def violation_rate(self) -> float:
        return len(self.violations) / self.n_checks if self.n_checks else 0.0

    def power(self, samples_per_level: int) -> dict[str, Any]:
        """`detectable_drop` and `bid_doubling` as JSON (None where not measured), with the sample size."""
        return {
            "samples_per_level": samples_per_level,
            "detectable_drop": None if np.isnan(self.detectable_drop) else self.detectable_drop,
            "bid_doubling": None if self.bid_doubling is None else self.bid_doubling.to_dict(),
        }


def _sampled(
    allocator: Allocator, cases: Sequence[AuctionRequest], streams: Sequence[tuple[int, ...]], n_samples: int
) -> list[list[str]]:
    """`n_samples` responses per case; cases with the same stream share their random numbers. A
    `SampledAllocator` draws them all in one batch, any other rule one case at a time.
    """
    if isinstance(allocator, SampledAllocator):
        seeds = [int(np.random.default_rng(list(stream)).integers(2**31)) for stream in streams]
        return allocator.sample(cases, n_samples, seeds)
    return [
        allocator.allocate([case] * n_samples, np.random.default_rng(list(stream)))
        for case, stream in zip(cases, streams, strict=True)
    ]


def _candidate_clicks(
    cases: Sequence[AuctionRequest],
    responses: Sequence[Sequence[str]],
    levels: Sequence[tuple[int, int]],
    click_model: ClickModel,
    max_ads: int | None,
) -> list[tuple[float, float, float]]:
    """Per level `(case, candidate ad)`, over the case's sampled responses: mean and standard error
    of the candidate's expected clicks (0 where it is not shown), and the share of responses that
    show it. A response is parsed and priced once, however many levels read it.
    """
    allocations = [
        [parse_response(response, len(cases[c].ads), max_ads).allocation for response in samples]
        for c, samples in enumerate(responses)
    ]
    wanted: dict[int, set[int]] = defaultdict(set)  # per case, the candidates read from its responses
    for c, ad in levels:
        wanted[c].add(ad)
    shown = [
        (c, s)
        for c, ads in wanted.items()
        for s, allocation in enumerate(allocations[c])
        if ads.intersection(allocation)
    ]
    # A click model may score many responses in one pass (psi does: one encoder and network call).
    many = getattr(click_model, "expected_ctr_many", None)
    if many is not None:
        ctrs = many([cases[c] for c, _ in shown], [responses[c][s] for c, s in shown])
    else:
        ctrs = [click_model.expected_ctr(cases[c], allocations[c][s], responses[c][s]) for c, s in shown]
    ctr_of = dict(zip(shown, ctrs, strict=True))
    out = []
    for c, ad in levels:
        clicks, inserted = np.zeros(len(responses[c])), np.zeros(len(responses[c]))
        for s, allocation in enumerate(allocations[c]):
            if ad in allocation:
                clicks[s], inserted[s] = ctr_of[c, s][allocation.index(ad)], 1.0
        se = float(clicks.std(ddof=1) / np.sqrt(len(clicks))) if len(clicks) > 1 else 0.0
        out.append((float(clicks.mean()), se, float(inserted.mean())))
    return out


def audit_monotonicity(
    allocator: Allocator,
    requests: Sequence[AuctionRequest],
    click_model: ClickModel,
    factors: Sequence[float],
    n_samples: int = 1,
    seed: int = 0,
    max_ads: int | None = None,
    z: float = 3.0,
    tolerance: float = 1e-9,
    bootstrap_samples: int = 1000,
    ci_level: float = 0.95,
) -> MonotonicityReport:
    """Raise each candidate's bid by each factor in turn and check its expected clicks never fall.

    One check compares two consecutive bid levels of one candidate in one request. Every case of one
    request is sampled with the same random stream (common random numbers across each candidate's
    bid levels), so the request as it came (factor 1) is one case for all its candidates, sampled
    once. Beside the verdict: the audit's power (`detectable_drop`) and how much bids drive the
    allocation (`bid_doubling`, when the factors hold 1 and 2).
    """
    cases: list[AuctionRequest] = []
    streams: list[tuple[int, ...]] = []
    levels: list[tuple[int, int]] = []  # (case, candidate): per request, candidate and factor in turn
    case_of: dict[tuple[float, ...], int] = {}
    for r, request in enumerate(requests):
        for i, ad in enumerate(request.ads):
            for f in factors:
                key = (r,) if f == 1.0 else (r, i, f)  # the request as it came: one case for all
                if key not in case_of:
                    case_of[key] = len(cases)
                    cases.append(request if f == 1.0 else request.with_bid(i, ad.bid * f))
                    streams.append((seed, r))
                levels.append((case_of[key], i))
    responses = _sampled(allocator, cases, streams, n_samples)
    by_level = iter(_candidate_clicks(cases, responses, levels, click_model, max_ads))
    doubling = (list(factors).index(1.0), list(factors).index(2.0)) if {1.0, 2.0} <= set(factors) else None
    violations: list[MonotonicityViolation] = []
    thresholds: list[float] = []
    doubling_by_request: list[float] = []
    for request in requests:
        changes = []
        for i in range(len(request.ads)):
            clicks = [next(by_level) for _ in factors]  # (clicks, their standard error, share shown)
            if doubling is not None:
                changes.append(clicks[doubling[1]][2] - clicks[doubling[0]][2])
            for (f_lo, (c_lo, se_lo, p_lo)), (f_hi, (c_hi, se_hi, p_hi)) in zip(
                zip(factors, clicks), zip(factors[1:], clicks[1:])
            ):
                threshold = max(tolerance, z * float(np.hypot(se_lo, se_hi)))
                if p_lo or p_hi:
                    thresholds.append(threshold)
                if c_lo - c_hi > threshold:
                    violations.append(
                        MonotonicityViolation(request.request_id, i, (f_lo, f_hi), (c_lo, c_hi))
                    )
        if changes:
            doubling_by_request.append(float(np.mean(changes)))
    n_checks = sum(len(r.ads) for r in requests) * (len(factors) - 1)
    return MonotonicityReport(
        n_checks,
        violations,
        detectable_drop=float(np.median(thresholds)) if thresholds else float("nan"),
        bid_doubling=bootstrap(
            np.asarray(doubling_by_request),
            None,
            bootstrap_samples,
            ci_level,
            np.random.default_rng([seed, 31]),
        )
        if doubling_by_request
        else None,
    )


@dataclass(frozen=True)
class IRReport:
    """Individual rationality under first-price PPC, from an impression log."""

    n_impressions: int
    n_overcharged: int
    """Impressions whose payment per click exceeds the bid (must be 0 under first price)."""
    n_truthful_advertisers: int
    n_truthful_negative_utility: int
    """Advertisers bidding at most their value whose expected utility is negative (must be 0)."""
    min_truthful_utility: float

    @property
    def holds(self) -> bool:
        return self.n_overcharged == 0 and self.n_truthful_negative_utility == 0


def audit_individual_rationality(
    impressions: pd.DataFrame, payment_per_click: np.ndarray | None = None, tolerance: float = 1e-9
) -> IRReport:
    """Check that no one pays above its bid and that bidding at most one's value never loses money.

    `payment_per_click` defaults to the bid (first price); pass another rule's payments to audit it.
    """
    bids = impressions["bid"].to_numpy(float)
    paid = first_price(bids) if payment_per_click is None else np.asarray(payment_per_click, dtype=float)
    utility = (impressions["value_per_click"].to_numpy(float) - paid) * impressions["expected_ctr"].to_numpy(
        float
    )
    per_advertiser = (
        impressions.assign(
            utility=utility, overbid=bids > impressions["value_per_click"].to_numpy(float) + tolerance
        )
        .groupby("advertiser_id")
        .agg(utility=("utility", "sum"), overbid=("overbid", "any"))
    )
    truthful = per_advertiser[~per_advertiser["overbid"]]
    return IRReport(
        n_impressions=len(impressions),
        n_overcharged=int((paid > bids + tolerance).sum()),
        n_truthful_advertisers=len(truthful),
        n_truthful_negative_utility=int((truthful["utility"] < -tolerance).sum()),
        min_truthful_utility=float(truthful["utility"].min()) if len(truthful) else 0.0,
    )
