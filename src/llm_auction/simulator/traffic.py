"""`llm-auction traffic`: the world's users at the endpoint.

Each request is sent to the policy server's V1 predict route with `concurrency` in flight; the
simulated user reads the served response and clicks each inserted ad with the click model's
probability (position, relevance, externalities: hidden from the server); clicks go to the
collector. Clicks are seeded per request, so the same responses give the same clicks in any order.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from llm_auction.contracts import AuctionRequest
from llm_auction.mechanism.payments import payment_per_click
from llm_auction.simulator.base import ClickModel, sample_clicks

MAX_BACKOFF_S = 2.0
TRANSIENT = frozenset({502, 503, 504})
INTERNAL_RETRIES = 2


@dataclass
class TrafficReport:
    """What a traffic run saw from the outside: volumes, clicks, latency, realised revenue."""

    sent: int = 0
    served: int = 0
    rejected: int = 0
    failed: int = 0
    impressions: int = 0
    clicks: int = 0
    clicks_acknowledged: int = 0
    revenue: float = 0.0
    seconds: float = 0.0
    latency_p50_ms: float = float("nan")
    latency_p99_ms: float = float("nan")
    first_served_at: str | None = None
    last_event_at: str | None = None
    policy_versions: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: int = 0

    @property
    def throughput(self) -> float:
        return self.served / self.seconds if self.seconds else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "throughput_rps": self.throughput, "errors": self.errors[:10]}


def click_events(
    request: AuctionRequest,
    prediction: dict[str, Any],
    click_model: ClickModel,
    rng: np.random.Generator,
    mean_delay_s: float,
) -> list[dict[str, Any]]:
    """The clicks of one simulated user on one served response (CloudEvent-free JSON for /v1/clicks)."""
    index = {ad.ad_id: i for i, ad in enumerate(request.ads)}
    shown = [a["ad_id"] for a in prediction["allocation"]]
    if not shown:
        return []
    ctr = click_model.expected_ctr(request, [index[a] for a in shown], prediction["response"])
    clicked = sample_clicks(np.asarray(ctr, dtype=float), rng)
    served_at = datetime.fromisoformat(prediction["served_at"])
    delays = rng.exponential(mean_delay_s, len(shown)) if mean_delay_s > 0 else np.zeros(len(shown))
    return [
        {
            "event_id": f"clk:{prediction['response_id']}:{ad_id}",
            "request_id": request.request_id,
            "response_id": prediction["response_id"],
            "ad_id": ad_id,
            "event_timestamp": (served_at + timedelta(seconds=float(delay))).isoformat(),
        }
        for ad_id, hit, delay in zip(shown, clicked, delays)
        if hit
    ]


def retry_delay(reply: httpx.Response | None, attempt: int) -> float:
    """The server's Retry-After when it gives one (a 503 under load), else capped exponential backoff."""
    after = reply.headers.get("retry-after", "") if reply is not None else ""
    if after.isdigit():
        return float(after)
    return min(0.2 * 2**attempt, MAX_BACKOFF_S)


async def _post(
    client: httpx.AsyncClient, url: str, body: Any, headers: dict[str, str], budget_s: float
) -> httpx.Response:
    """POST with retries; a 4xx is the caller's answer.

    Transport errors and 502/503/504 (a server restarting, load shed, a dependency down) are retried
    for up to `budget_s`, which outlasts a server restart: a crash costs users time, not requests.
    Any other 5xx is a fault of the server that retrying will not mend: `INTERNAL_RETRIES` tries.
    """
    deadline = time.monotonic() + budget_s
    attempt = 0
    while True:
        reply: httpx.Response | None = None
        try:
            reply = await client.post(url, json=body, headers=headers)
            if reply.status_code < 500:
                return reply
        except httpx.TransportError as exc:
            error = exc
        delay = retry_delay(reply, attempt)
        internal = reply is not None and reply.status_code not in TRANSIENT
        if time.monotonic() + delay > deadline or (internal and attempt >= INTERNAL_RETRIES):
            if reply is None:
                raise error
            return reply
        await asyncio.sleep(delay)
        attempt += 1


def _auth(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


async def send_traffic(
    endpoint: str,
    requests: Sequence[AuctionRequest],
    click_model: ClickModel,
    *,
    collector: str | None = None,
    model_name: str = "policy",
    concurrency: int = 8,
    seed: int = 0,
    mean_click_delay_s: float = 2.0,
    token: str | None = None,
    collector_token: str | None = None,
    progress: bool = True,
    retry_budget_s: float = 120.0,
    skip: Collection[str] = (),
) -> TrafficReport:
    """Send `requests` one per call, simulate the user's clicks, post them to `collector`.

    Requests whose id is in `skip` (already served and logged before an interruption) are not sent
    again; the others keep their place in `requests`, so their users click as they would have.
    """
    report = TrafficReport(skipped=sum(r.request_id in skip for r in requests))
    latencies: list[float] = []
    served_times: list[datetime] = []
    # On a terminal the bar redraws in place; into a file or a CI log every redraw is a new line.
    every_s = 0.1 if sys.stderr.isatty() else 15.0
    bar = tqdm(
        total=len(requests) - report.skipped,
        desc="traffic",
        unit="req",
        disable=not progress,
        mininterval=every_s,
    )
    semaphore = asyncio.Semaphore(concurrency)
    predict_url = f"{endpoint.rstrip('/')}/v1/models/{model_name}:predict"
    clicks_url = f"{collector.rstrip('/')}/v1/clicks" if collector else None
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)

    async def one(i: int, request: AuctionRequest, client: httpx.AsyncClient) -> None:
        async with semaphore:
            report.sent += 1
            start = time.perf_counter()
            try:
                reply = await _post(
                    client,
                    predict_url,
                    {"instances": [request.model_dump(mode="json")]},
                    _auth(token),
                    retry_budget_s,
                )
            except httpx.HTTPError as exc:
                report.failed += 1
                report.errors.append(f"{request.request_id}: {type(exc).__name__}: {exc}")
                return
            finally:
                bar.update(1)
            if reply.status_code >= 400:
                report.rejected += reply.status_code < 500
                report.failed += reply.status_code >= 500
                report.errors.append(f"{request.request_id}: HTTP {reply.status_code}: {reply.text[:200]}")
                return
            latencies.append(time.perf_counter() - start)
            (prediction,) = reply.json()["predictions"]
            report.served += 1
            report.impressions += len(prediction["allocation"])
            version = str(prediction["policy_version"])
            report.policy_versions[version] = report.policy_versions.get(version, 0) + 1
            served_times.append(datetime.fromisoformat(prediction["served_at"]))
            clicks = click_events(
                request, prediction, click_model, np.random.default_rng([seed, i]), mean_click_delay_s
            )
            report.clicks += len(clicks)
            bids = {ad.ad_id: ad.bid for ad in request.ads}
            report.revenue += float(payment_per_click([bids[c["ad_id"]] for c in clicks]).sum())
            served_times.extend(datetime.fromisoformat(c["event_timestamp"]) for c in clicks)
            if clicks and clicks_url:
                ack = await _post(client, clicks_url, clicks, _auth(collector_token), retry_budget_s)
                if ack.status_code == 202:
                    report.clicks_acknowledged += len(clicks)
                else:
                    report.errors.append(
                        f"clicks of {request.request_id}: HTTP {ack.status_code}: {ack.text[:200]}"
                    )

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        await asyncio.gather(*(one(i, r, client) for i, r in enumerate(requests) if r.request_id not in skip))
    bar.close()
    report.seconds = time.perf_counter() - start
    if latencies:
        report.latency_p50_ms = float(np.percentile(latencies, 50) * 1000)
        report.latency_p99_ms = float(np.percentile(latencies, 99) * 1000)
    if served_times:
        report.first_served_at = min(served_times).isoformat()
        report.last_event_at = max(served_times).isoformat()
    return report
