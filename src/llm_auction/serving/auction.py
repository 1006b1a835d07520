"""The auction around the policy: request validation, prompts, and the priced allocation.

Pure functions shared by the local server and the KServe transformer on the cluster, so the
contract of `POST /v1/models/<name>:predict` is one piece of code:

    request:  {"instances": [auction request, ...]}            (`contracts.AuctionRequest`)
    response: {"predictions": [{"request_id", "response_id", "response", "policy_version",
               "served_at", "format_errors", "allocation": [{"ad_id", "advertiser_id",
               "position", "bid", "pctr", "expected_payment"}], "expected_revenue"}]}

`expected_payment` is first-price pay-per-click in expectation, bid * pCTR (ARCHITECTURE.md,
"The mathematics"); it is null when no pCTR model is registered yet.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import TypeAdapter, ValidationError

from llm_auction.config import ServingConfig, describe_validation_error
from llm_auction.contracts import AuctionRequest, check_bid_cap
from llm_auction.mechanism.grammar import parse_response
from llm_auction.mechanism.payments import expected_payments

INSTANCES = TypeAdapter(list[AuctionRequest])


class AuctionInputError(ValueError):
    """A predict payload that cannot be served; the message names the field (an HTTP 4xx)."""


def parse_instances(body: Any, cfg: ServingConfig, max_bid: float) -> list[AuctionRequest]:
    """The auction requests of a V1 predict body, or an error naming the first bad field."""
    if not isinstance(body, Mapping):
        raise AuctionInputError('body: expected a JSON object {"instances": [...]}')
    unknown = sorted(set(body) - {"instances", "parameters"})
    if unknown:
        raise AuctionInputError(f"{unknown[0]}: unknown key; the body holds only instances (and parameters)")
    if "instances" not in body:
        raise AuctionInputError("instances: field required")
    instances = body["instances"]
    if not isinstance(instances, list) or not instances:
        raise AuctionInputError("instances: expected a non-empty list of auction requests")
    if len(instances) > cfg.max_instances:
        raise AuctionInputError(
            f"instances: {len(instances)} requests exceed the maximum {cfg.max_instances}"
        )
    try:
        requests = INSTANCES.validate_python(instances)
    except ValidationError as exc:
        message = describe_validation_error(exc, "invalid auction request")
        raise AuctionInputError(message.replace(": ", ": instances.", 1)) from None
    for i, request in enumerate(requests):
        if len(request.ads) > cfg.max_candidates:
            raise AuctionInputError(
                f"instances.{i}.ads: {len(request.ads)} candidates exceed the maximum {cfg.max_candidates}"
            )
        try:
            check_bid_cap(request, max_bid)
        except ValueError as exc:
            raise AuctionInputError(f"instances.{i}.{exc}") from None
    return requests


def prediction(
    request: AuctionRequest,
    response: str,
    *,
    response_id: str,
    policy_version: str,
    served_at: datetime,
    max_ads: int,
    pctr: Sequence[float] | None,
    arm: str = "champion",
) -> dict[str, Any]:
    """One priced allocation; `pctr` holds the click estimate of each inserted ad, in order; `arm`
    says whether the champion or the challenger (in canary) answered.
    """
    parsed = parse_response(response, len(request.ads), request.ad_limit(max_ads))
    allocation = []
    for position, index in enumerate(parsed.allocation, start=1):
        ad = request.ads[index]
        p = None if pctr is None else float(pctr[position - 1])
        allocation.append(
            {
                "ad_id": ad.ad_id,
                "advertiser_id": ad.advertiser_id,
                "position": position,
                "bid": ad.bid,
                "pctr": p,
                "expected_payment": None if p is None else float(expected_payments([ad.bid], [p])[0]),
            }
        )
    payments = [a["expected_payment"] for a in allocation]
    return {
        "request_id": request.request_id,
        "response_id": response_id,
        "response": response,
        "policy_version": policy_version,
        "arm": arm,
        "served_at": served_at.isoformat(),
        "format_errors": parsed.n_errors,
        "allocation": allocation,
        "expected_revenue": None if pctr is None else math.fsum(p for p in payments if p is not None),
    }
