"""The feedback collector: KServe inference-logger CloudEvents and clicks, durably and exactly once.

- `POST /v1/events`: a CloudEvent in binary mode (`ce-id`, `ce-type`, `ce-source`,
  `ce-specversion` headers, JSON body), as KServe's logger sends one for the request and one for
  the response of every inference, both under the same `ce-id`;
- `POST /v1/clicks`: one click event (or a list) as JSON;
- `GET /healthz`, `GET /metrics` (Prometheus).

An event is acknowledged (202) only after its row is committed to SQLite in WAL mode with
`synchronous=FULL`, so an acknowledged event survives a crash of the process. Event ids are
primary keys: a retried event is acknowledged again (`duplicate: true`) and stored once. A write
the disk refuses is rolled back and answered 507 (full) or 503, so nothing unstored is acknowledged.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from llm_auction.config import describe_validation_error
from llm_auction.serving.auth import bearer_ok

DB_FILE = "events.db"
CE_HEADERS = ("ce-id", "ce-type", "ce-source", "ce-specversion")
SCHEMA = """
CREATE TABLE IF NOT EXISTS inference_events (
    ce_id TEXT NOT NULL, kind TEXT NOT NULL, ce_type TEXT NOT NULL, ce_source TEXT NOT NULL,
    received_at TEXT NOT NULL, payload TEXT NOT NULL, PRIMARY KEY (ce_id, kind)
);
CREATE TABLE IF NOT EXISTS clicks (
    event_id TEXT PRIMARY KEY, request_id TEXT NOT NULL, response_id TEXT NOT NULL, ad_id TEXT NOT NULL,
    event_timestamp TEXT NOT NULL, received_at TEXT NOT NULL
);
"""


class Click(BaseModel):
    """A click on an inserted ad; `event_id` makes it idempotent."""

    model_config = ConfigDict(extra="forbid")

    event_id: str = Field(min_length=1, max_length=200)
    request_id: str = Field(min_length=1, max_length=200)
    response_id: str = Field(min_length=1, max_length=200)
    ad_id: str = Field(min_length=1, max_length=200)
    event_timestamp: AwareDatetime


CLICKS = TypeAdapter(Click | list[Click])


class StoreWriteError(RuntimeError):
    """The event store could not commit a write; `full` when the disk is out of space."""

    def __init__(self, path: Path, exc: sqlite3.OperationalError) -> None:
        self.full = getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL or "full" in str(exc)
        super().__init__(f"event store {path}: {exc}; nothing of this request was stored, retry later")


class EventStore:
    """One SQLite file; every write is its own committed transaction (what makes an ack durable)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_FILE
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def _insert(self, sql: str, rows: list[tuple]) -> list[bool]:
        """Insert each row unless its key exists; True for the new ones. Committed before returning.

        A write the disk refuses (full, read-only, I/O error) rolls the whole batch back and is a
        `StoreWriteError`: nothing of it is stored, so nothing of it may be acknowledged.
        """
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    inserted = [self._db.execute(sql, row).rowcount == 1 for row in rows]
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                raise StoreWriteError(self.path, exc) from exc
        return inserted

    def add_inference(self, ce_id: str, kind: str, ce_type: str, ce_source: str, payload: Any) -> bool:
        sql = "INSERT OR IGNORE INTO inference_events VALUES (?, ?, ?, ?, ?, ?)"
        row = (ce_id, kind, ce_type, ce_source, _now(), json.dumps(payload))
        return self._insert(sql, [row])[0]

    def add_clicks(self, clicks: list[Click]) -> list[bool]:
        sql = "INSERT OR IGNORE INTO clicks VALUES (?, ?, ?, ?, ?, ?)"
        rows = [
            (c.event_id, c.request_id, c.response_id, c.ad_id, c.event_timestamp.isoformat(), _now())
            for c in clicks
        ]
        return self._insert(sql, rows)

    def click_ids(self) -> list[str]:
        with self._lock:
            return [row[0] for row in self._db.execute("SELECT event_id FROM clicks ORDER BY event_id")]

    def click_rows(self) -> list[tuple[str, str, str, str, str]]:
        """(event_id, event_timestamp, request_id, response_id, ad_id) of every click, the feedback schema."""
        sql = "SELECT event_id, event_timestamp, request_id, response_id, ad_id FROM clicks ORDER BY event_id"
        with self._lock:
            return list(self._db.execute(sql))

    def inference_pairs(self) -> list[tuple[str, Any, Any]]:
        """(ce_id, request payload, response payload) of every inference whose two events arrived."""
        sql = (
            "SELECT q.ce_id, q.payload, r.payload FROM inference_events q JOIN inference_events r "
            "ON q.ce_id = r.ce_id AND q.kind = 'request' AND r.kind = 'response' ORDER BY q.received_at"
        )
        with self._lock:
            return [(i, json.loads(q), json.loads(r)) for i, q, r in self._db.execute(sql)]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _now() -> str:
    return datetime.now(UTC).isoformat()


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(
    store: EventStore,
    token: str | None = None,
    max_body_bytes: int = 1_000_000,
    collectors: Sequence[Collector] = (),
) -> FastAPI:
    """The collector's HTTP API over `store`; `token` turns on bearer authentication of the POST routes;
    `collectors` add to `/metrics` (the canary's per-arm metrics, `serving.arm_metrics`).
    """
    app = FastAPI(title="llm-auction feedback collector", docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry()
    for extra in collectors:
        registry.register(extra)
    events = Counter("collector_events", "Events acknowledged", ["kind", "outcome"], registry=registry)
    rejected = Counter("collector_rejected", "Requests refused", ["reason"], registry=registry)
    commit = Histogram("collector_commit_seconds", "Time to commit an acknowledged batch", registry=registry)

    async def read_body(request: Request) -> tuple[bytes | None, JSONResponse | None]:
        if token is not None and not bearer_ok(request.headers.get("authorization"), token):
            rejected.labels("auth").inc()
            return None, _error(401, "authorization: missing or wrong bearer token")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            rejected.labels("too_large").inc()
            return None, _error(413, f"body: {declared} bytes exceeds the limit of {max_body_bytes}")
        body = await request.body()
        if len(body) > max_body_bytes:
            rejected.labels("too_large").inc()
            return None, _error(413, f"body: {len(body)} bytes exceeds the limit of {max_body_bytes}")
        return body, None

    @app.post("/v1/events")
    async def inference_event(request: Request) -> JSONResponse:
        body, refusal = await read_body(request)
        if refusal is not None:
            return refusal
        missing = [h for h in CE_HEADERS if not request.headers.get(h)]
        if missing:
            rejected.labels("invalid").inc()
            return _error(400, f"{', '.join(missing)}: missing CloudEvents header (binary mode)")
        ce_type = request.headers["ce-type"]
        kind = (
            "request" if ce_type.endswith(".request") else "response" if ce_type.endswith(".response") else ""
        )
        if not kind:
            rejected.labels("invalid").inc()
            return _error(400, f"ce-type: {ce_type!r} is neither an inference request nor a response")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            rejected.labels("invalid").inc()
            return _error(400, f"body: not valid JSON ({exc})")
        start = time.perf_counter()
        new = store.add_inference(
            request.headers["ce-id"], kind, ce_type, request.headers["ce-source"], payload
        )
        commit.observe(time.perf_counter() - start)
        events.labels(kind, "accepted" if new else "duplicate").inc()
        return JSONResponse({"accepted": True, "duplicate": not new}, status_code=202)

    @app.post("/v1/clicks")
    async def clicks(request: Request) -> JSONResponse:
        body, refusal = await read_body(request)
        if refusal is not None:
            return refusal
        try:
            parsed = CLICKS.validate_json(body)
        except ValidationError as exc:
            rejected.labels("invalid").inc()
            return _error(422, describe_validation_error(exc, "invalid click"))
        batch = parsed if isinstance(parsed, list) else [parsed]
        start = time.perf_counter()
        new = store.add_clicks(batch)
        commit.observe(time.perf_counter() - start)
        for is_new in new:
            events.labels("click", "accepted" if is_new else "duplicate").inc()
        return JSONResponse({"accepted": len(batch), "duplicates": new.count(False)}, status_code=202)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    @app.exception_handler(StoreWriteError)
    async def unwritable(request: Request, exc: StoreWriteError) -> JSONResponse:  # 507 / 503: retry later
        rejected.labels("store_full" if exc.full else "store_error").inc()
        return JSONResponse(
            {"error": str(exc)}, status_code=507 if exc.full else 503, headers={"retry-after": "5"}
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:  # never a traceback to a client
        rejected.labels("internal").inc()
        return _error(500, f"internal error: {type(exc).__name__}")

    return app
