"""The canary's per-arm online metrics as Prometheus gauges on the collector's `/metrics`.

Computed from the collector's own store at scrape time (at most every `max_age_s`), per arm and
policy version: requests answered, ad impressions, clicks and realised revenue (first-price
pay-per-click). Revenue per request, ITCTR and ad load are ratios of these in PromQL, e.g.
`collector_arm_revenue / collector_arm_requests`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from llm_auction.evaluation.canary import canary_outcomes
from llm_auction.serving.collector import EventStore
from llm_auction.serving.export import feedback_frames

MEASURES = {
    "requests": "Auction requests answered",
    "impressions": "Ad impressions shown",
    "clicks": "Clicks on shown ads",
    "revenue": "Realised revenue (the bid of every clicked ad)",
}
log = logging.getLogger(__name__)


class ArmMetrics(Collector):
    """A scrape never fails because of the store: a logged event that does not parse is counted in
    `collector_arm_refresh_errors` and logged, and the last good numbers stay.
    """

    def __init__(self, store: EventStore, max_age_s: float = 5.0) -> None:
        self.store, self.max_age_s = store, max_age_s
        self._lock = threading.Lock()
        self._at = -float("inf")
        self._rows: list[tuple[str, str, dict[str, float]]] = []
        self._errors = 0

    def _refresh(self) -> list[tuple[str, str, dict[str, float]]]:
        with self._lock:
            if time.monotonic() - self._at > self.max_age_s:
                self._at = time.monotonic()
                try:
                    outcomes = canary_outcomes(*feedback_frames(self.store))
                except (ValueError, KeyError, TypeError) as exc:  # pydantic's ValidationError is a ValueError
                    self._errors += 1
                    log.warning("per-arm metrics not refreshed: a logged inference does not parse: %s", exc)
                    return self._rows
                sums = outcomes.groupby(["arm", "policy_version"]).agg(
                    requests=("request_id", "size"),
                    impressions=("n_ads", "sum"),
                    clicks=("clicks", "sum"),
                    revenue=("revenue", "sum"),
                )
                self._rows = [(arm, version, row) for (arm, version), row in sums.to_dict("index").items()]
            return self._rows

    def collect(self) -> Iterator[GaugeMetricFamily]:
        rows = self._refresh()
        for measure, text in MEASURES.items():
            family = GaugeMetricFamily(f"collector_arm_{measure}", text, labels=["arm", "policy_version"])
            for arm, version, values in rows:
                family.add_metric([arm, version], float(values[measure]))
            yield family
        yield CounterMetricFamily(
            "collector_arm_refresh_errors", "Refreshes of the per-arm metrics that failed", self._errors
        )
