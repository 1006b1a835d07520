"""What KServe's inference logger does on the cluster, for the local server: every inference goes to
the collector as two CloudEvents in binary mode (request, then response) under one `ce-id`.

Sending happens off the request path (a queue and one sender task), with retries and backoff;
an event the collector never acknowledged is counted and logged, never dropped silently.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Any

import httpx
from prometheus_client import Counter, Gauge

from llm_auction.config import Settings

logger = logging.getLogger(__name__)

CE_TYPE = "org.kubeflow.serving.inference"
LOGGED = Counter("llm_auction_inference_events", "Inference CloudEvents sent to the collector", ["outcome"])
PENDING = Gauge("llm_auction_inference_events_pending", "Inferences waiting to be sent to the collector")


class InferenceLogger:
    def __init__(self, url: str, source: str, token: str | None = None, retries: int = 5) -> None:
        self.url = url
        self.source = source
        self.token = token
        self.retries = retries
        self._queue: asyncio.Queue[tuple[str, Any, Any]] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> InferenceLogger | None:
        cfg = settings.serving
        if cfg.logger_url is None:
            return None
        source = f"urn:llm-auction:serving:{cfg.model_name}"
        return cls(cfg.logger_url, source, os.environ.get(cfg.logger_token_env) or None)

    def log(self, ce_id: str, request: Any, response: Any) -> None:
        """Queue one inference (never blocks the caller)."""
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._client = httpx.AsyncClient(timeout=10)
            self._sender = asyncio.get_running_loop().create_task(self._send_all())
        self._queue.put_nowait((ce_id, request, response))
        PENDING.inc()

    async def _post(self, ce_id: str, kind: str, payload: Any) -> None:
        assert self._client is not None
        headers = {
            "ce-id": ce_id,
            "ce-type": f"{CE_TYPE}.{kind}",
            "ce-source": self.source,
            "ce-specversion": "1.0",
            "content-type": "application/json",
        }
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        delay = 0.1
        for attempt in range(self.retries + 1):
            try:
                reply = await self._client.post(self.url, content=json.dumps(payload), headers=headers)
                if reply.status_code < 500:
                    reply.raise_for_status()  # a 4xx will not get better by retrying
                    return
            except httpx.TransportError as exc:
                if attempt == self.retries:
                    raise
                logger.debug("collector unreachable (%s), retrying", exc)
            if attempt < self.retries:
                await asyncio.sleep(delay)
                delay *= 2
        raise httpx.HTTPError(f"collector kept failing for ce-id {ce_id}")

    async def _send_all(self) -> None:
        assert self._queue is not None
        while True:
            ce_id, request, response = await self._queue.get()
            try:
                await self._post(ce_id, "request", request)
                await self._post(ce_id, "response", response)
                LOGGED.labels("sent").inc()
            except httpx.HTTPError as exc:
                LOGGED.labels("failed").inc()
                logger.error("inference %s not logged to %s: %s", ce_id, self.url, exc)
            finally:
                PENDING.dec()
