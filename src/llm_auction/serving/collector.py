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

Group commit: requests do not each pay their own fsync. Their rows go to one writer thread, which
commits whatever has queued while the previous commit was on disk (up to `max_group` rows) in one
transaction, then answers each waiting request. A lone request commits at once (the writer never
waits for company); under concurrency the commits, not the requests, are what the disk counts. The
rows of a group are inserted in arrival order, so a duplicate inside one group is told apart
exactly as across groups; a write the disk refuses fails every request of its group, and only
those. `max_group=1` (or `LLM_AUCTION_COLLECTOR_MAX_GROUP=1`) is one commit per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.registry import Collector
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from llm_auction.config import describe_validation_error
from llm_auction.serving.auth import bearer_ok

logger = logging.getLogger(__name__)

DB_FILE = "events.db"
# Rows one commit may hold: enough for every request in flight at once (a request is never split).
DEFAULT_MAX_GROUP = 1024
MAX_GROUP_ENV = "LLM_AUCTION_COLLECTOR_MAX_GROUP"
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


def default_max_group() -> int:
    """Rows one commit may hold: `LLM_AUCTION_COLLECTOR_MAX_GROUP`, else `DEFAULT_MAX_GROUP`."""
    raw = os.environ.get(MAX_GROUP_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_GROUP
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{MAX_GROUP_ENV}={raw!r}: must be a whole number of rows, at least 1")
    return int(raw)


@dataclass
class _Write:
    """One request's rows, inserted together and answered through `future` (new or duplicate per row)."""

    sql: str
    rows: list[tuple]
    future: Future[list[bool]] = field(default_factory=Future)


CommitListener = Callable[[int, int, float], None]


class _GroupWriter:
    """The store's connection and its single writer thread (group commit; the module docstring).

    Kept apart from `EventStore` so that the thread does not keep the store alive: a store dropped
    without `close()` stops its writer once collected.
    """

    def __init__(self, path: Path, max_group: int) -> None:
        self.path, self.max_group = path, max_group
        self.lock = threading.Lock()  # the connection: the writer's transactions and the readers
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        self.commits = 0
        self.listeners: list[CommitListener] = []
        self._wake = threading.Condition()  # guards the fields below
        self._pending: deque[_Write] = deque()
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, *writes: _Write) -> None:
        """Queue writes, in this order; each one's future is resolved once its group is committed."""
        with self._wake:
            if self._closed:
                raise RuntimeError(f"event store {self.path}: closed")
            self._pending.extend(writes)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="event-store-writer", daemon=True)
                self._thread.start()
            self._wake.notify()

    def stop(self, wait: bool = False) -> None:
        """No new writes; the writer commits what is queued, then ends (`wait`: until it has)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
            thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join()

    def _take(self) -> list[_Write]:
        """The queued writes, oldest first, up to `max_group` rows (always one: a request is never split)."""
        group: list[_Write] = []
        rows = 0
        while self._pending and (not group or rows + len(self._pending[0].rows) <= self.max_group):
            write = self._pending.popleft()
            if write.future.set_running_or_notify_cancel():  # False: its caller gave up, nothing to do
                group.append(write)
                rows += len(write.rows)
        return group

    def _commit(self, group: list[_Write]) -> list[list[bool]] | Exception:
        """Insert every write of the group in one transaction; what each inserted, or why none did."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                inserted = [[self.db.execute(w.sql, row).rowcount == 1 for row in w.rows] for w in group]
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except Exception as exc:  # handed to every request of the group, which fails with it
            return exc
        return inserted

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                if not self._pending:
                    return
            with self.lock:
                with self._wake:  # what queued while a reader held the connection joins this group
                    group = self._take()
                if not group:
                    continue
                start = time.perf_counter()
                outcome = self._commit(group)
                seconds = time.perf_counter() - start
            if isinstance(outcome, Exception):
                for write in group:  # a fresh error each: the requests raise them concurrently
                    error = (
                        StoreWriteError(self.path, outcome)
                        if isinstance(outcome, sqlite3.OperationalError)
                        else outcome
                    )
                    write.future.set_exception(error)
                continue
            self.commits += 1
            for write, inserted in zip(group, outcome):
                write.future.set_result(inserted)
            for listener in list(self.listeners):
                try:
                    listener(len(group), sum(len(w.rows) for w in group), seconds)
                except Exception:  # a metric must never stop the writer
                    logger.exception("event store: a commit listener failed")


class _AsyncFront:
    """The writes of one event loop's requests, handed to the writer a group at a time.

    While a group is being committed, the requests that arrive meanwhile wait here; the next group
    is all of them (up to `max_group` rows). One thread hop and one wake-up of the loop per group,
    not per request: under load the event loop's time goes to the requests, not to hand-offs.
    """

    def __init__(self, writer: _GroupWriter) -> None:
        self.writer = writer
        self.pending: deque[tuple[_Write, asyncio.Future[list[bool]]]] = deque()
        self.task: asyncio.Task[None] | None = None

    async def write(self, write: _Write) -> list[bool]:
        waiter = asyncio.get_running_loop().create_future()
        self.pending.append((write, waiter))
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._flush())
        return await waiter

    def _take(self) -> list[tuple[_Write, asyncio.Future[list[bool]]]]:
        group, rows = [], 0
        while self.pending and (not group or rows + len(self.pending[0][0].rows) <= self.writer.max_group):
            group.append(self.pending.popleft())
            rows += len(group[-1][0].rows)
        return group

    async def _flush(self) -> None:
        try:
            while self.pending:
                group = self._take()
                writes = [write for write, _ in group]
                try:
                    self.writer.submit(*writes)
                except RuntimeError as exc:  # the store is closed: nothing of the group was queued
                    for _, waiter in group:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    continue
                # The writer resolves its queue in order: once the last is done, all are. Its outcome
                # is read below, write by write, as every other one's.
                with contextlib.suppress(Exception):
                    await asyncio.wrap_future(writes[-1].future)
                for write, waiter in group:
                    if waiter.done():  # its request was cancelled; the write stands (a retry is a duplicate)
                        continue
                    error = write.future.exception()
                    if error is None:
                        waiter.set_result(write.future.result())
                    else:
                        waiter.set_exception(error)
        finally:
            self.task = None


class EventStore:
    """One SQLite file; an event is acknowledged once a committed transaction holds it.

    Writes go through one writer thread that commits concurrent requests together (group commit,
    at most `max_group` rows a transaction; the module docstring). `add_inference` and `add_clicks`
    block until their rows are durable; `submit_inference` and `submit_clicks` return a future
    instead; `write_inference` and `write_clicks` are coroutines (what the HTTP routes await).
    """

    def __init__(self, directory: Path, max_group: int | None = None) -> None:
        """Open (or create) the store in `directory`.

        Args:
            directory: Folder of `events.db`.
            max_group: Most rows one commit holds (default `default_max_group()`); 1 is one commit
                per request, the behaviour before group commit.
        """
        max_group = default_max_group() if max_group is None else max_group
        if max_group < 1:
            raise ValueError(f"max_group={max_group}: must be at least 1")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / DB_FILE
        self.max_group = max_group
        self._writer = _GroupWriter(self.path, max_group)
        self._lock, self._db = self._writer.lock, self._writer.db
        self._fronts: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _AsyncFront] = (
            weakref.WeakKeyDictionary()
        )
        weakref.finalize(self, self._writer.stop)

    @property
    def commits(self) -> int:
        """Transactions the writer has committed (each one fsync), since this store was opened."""
        return self._writer.commits

    @property
    def on_commit(self) -> list[CommitListener]:
        """Called after each commit with (requests, rows, seconds) from the writer thread."""
        return self._writer.listeners

    @staticmethod
    def _inference(ce_id: str, kind: str, ce_type: str, ce_source: str, payload: Any) -> _Write:
        sql = "INSERT OR IGNORE INTO inference_events VALUES (?, ?, ?, ?, ?, ?)"
        return _Write(sql, [(ce_id, kind, ce_type, ce_source, _now(), json.dumps(payload))])

    @staticmethod
    def _clicks(clicks: Sequence[Click]) -> _Write:
        sql = "INSERT OR IGNORE INTO clicks VALUES (?, ?, ?, ?, ?, ?)"
        now = _now()
        rows = [
            (c.event_id, c.request_id, c.response_id, c.ad_id, c.event_timestamp.isoformat(), now)
            for c in clicks
        ]
        return _Write(sql, rows)

    def submit_inference(
        self, ce_id: str, kind: str, ce_type: str, ce_source: str, payload: Any
    ) -> Future[list[bool]]:
        """Queue one inference event; the future holds `[new]` once committed, or `StoreWriteError`."""
        write = self._inference(ce_id, kind, ce_type, ce_source, payload)
        self._writer.submit(write)
        return write.future

    def submit_clicks(self, clicks: Sequence[Click]) -> Future[list[bool]]:
        """Queue clicks (stored together or not at all); the future holds new-or-duplicate per click."""
        write = self._clicks(clicks)
        self._writer.submit(write)
        return write.future

    def add_inference(self, ce_id: str, kind: str, ce_type: str, ce_source: str, payload: Any) -> bool:
        """Store one inference event once committed; False if its (ce_id, kind) was already there.

        Raises:
            StoreWriteError: the disk refused the write; nothing of it is stored.
        """
        return self.submit_inference(ce_id, kind, ce_type, ce_source, payload).result()[0]

    def add_clicks(self, clicks: list[Click]) -> list[bool]:
        """Store clicks once committed, all or none; True for each new one, False for a duplicate.

        Raises:
            StoreWriteError: the disk refused the write; nothing of it is stored.
        """
        return self.submit_clicks(clicks).result()

    def _front(self) -> _AsyncFront:
        loop = asyncio.get_running_loop()
        front = self._fronts.get(loop)
        if front is None:
            front = self._fronts[loop] = _AsyncFront(self._writer)
        return front

    async def write_inference(
        self, ce_id: str, kind: str, ce_type: str, ce_source: str, payload: Any
    ) -> bool:
        """`add_inference` for a coroutine: waits for the commit without blocking the event loop, and
        the loop's concurrent writes are handed to the writer together (`_AsyncFront`).
        """
        return (await self._front().write(self._inference(ce_id, kind, ce_type, ce_source, payload)))[0]

    async def write_clicks(self, clicks: Sequence[Click]) -> list[bool]:
        """`add_clicks` for a coroutine (as `write_inference`)."""
        return await self._front().write(self._clicks(clicks))

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
        """Commit what is queued, stop the writer and close the file."""
        self._writer.stop(wait=True)
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
) -> Starlette:
    """The collector's HTTP API over `store`; `token` turns on bearer authentication of the POST routes;
    `collectors` add to `/metrics` (the canary's per-arm metrics, `serving.arm_metrics`).
    """
    registry = CollectorRegistry()
    for extra in collectors:
        registry.register(extra)
    events = Counter("collector_events", "Events acknowledged", ["kind", "outcome"], registry=registry)
    rejected = Counter("collector_rejected", "Requests refused", ["reason"], registry=registry)
    commit = Histogram(
        "collector_commit_seconds", "Time from a request's rows queued to committed", registry=registry
    )
    commits = Counter("collector_commits", "Transactions committed (one fsync each)", registry=registry)
    group_size = Histogram(
        "collector_group_requests",
        "Requests committed together in one transaction",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        registry=registry,
    )

    def committed(requests: int, rows: int, seconds: float) -> None:
        commits.inc()
        group_size.observe(requests)

    store.on_commit.append(committed)

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
        ce_id, ce_source = request.headers["ce-id"], request.headers["ce-source"]
        new = await store.write_inference(ce_id, kind, ce_type, ce_source, payload)
        commit.observe(time.perf_counter() - start)
        events.labels(kind, "accepted" if new else "duplicate").inc()
        return JSONResponse({"accepted": True, "duplicate": not new}, status_code=202)

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
        new = await store.write_clicks(batch)
        commit.observe(time.perf_counter() - start)
        for is_new in new:
            events.labels("click", "accepted" if is_new else "duplicate").inc()
        return JSONResponse({"accepted": len(batch), "duplicates": new.count(False)}, status_code=202)

    async def healthz(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request) -> PlainTextResponse:
        return PlainTextResponse(generate_latest(registry).decode(), media_type="text/plain; version=0.0.4")

    async def unwritable(request: Request, exc: StoreWriteError) -> JSONResponse:  # 507 / 503: retry later
        rejected.labels("store_full" if exc.full else "store_error").inc()
        return JSONResponse(
            {"error": str(exc)}, status_code=507 if exc.full else 503, headers={"retry-after": "5"}
        )

    async def internal(request: Request, exc: Exception) -> JSONResponse:  # never a traceback to a client
        rejected.labels("internal").inc()
        return _error(500, f"internal error: {type(exc).__name__}")

    # Plain Starlette (FastAPI's routing sits on it): these routes take a Request and return a
    # response, so FastAPI's layers would only add CPU to every acknowledgement.
    return Starlette(
        routes=[
            Route("/v1/events", inference_event, methods=["POST"]),
            Route("/v1/clicks", clicks, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={StoreWriteError: unwritable, Exception: internal},
    )
