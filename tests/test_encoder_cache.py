"""The encoder's disk cache: shared by processes, survives a killed writer, bounded, never fatal.

The model is replaced by a deterministic stand-in (a fixed unit vector per text): the point is the
store, not phi.
"""

import hashlib
import logging
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from llm_auction.config import load_config
from llm_auction.features.encoder import EMBEDDING_DIM, TextEncoder, encoder_for, text_key


def fake_vector(text: str) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).standard_normal(EMBEDDING_DIM)
    return (vector / np.linalg.norm(vector)).astype(np.float32)


class FakeModel:
    """Stands in for SentenceTransformer; counts the texts it is asked to encode."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def encode(self, texts: list[str], **_: object) -> np.ndarray:
        self.seen += texts
        return np.stack([fake_vector(t) for t in texts])


class NoModel:
    def encode(self, texts: list[str], **_: object) -> np.ndarray:
        raise AssertionError(f"the cache should have held {texts[:3]}")


def fake_encoder(model: object = None, **kwargs: object) -> TextEncoder:
    encoder = TextEncoder(**kwargs)
    encoder._model = model if model is not None else FakeModel()  # `_load` returns it; phi never loads
    return encoder


def write_batches(name: str, cache: str, log: str, stop: str) -> None:
    """A writer process: flushes batches of 5 new texts, logging each batch's texts only after its flush.

    Runs until the `stop` file exists, then writes one more batch (so it also writes after the other
    writer died); the victim is never told to stop.
    """
    encoder = fake_encoder(cache_path=Path(cache), memory_max_entries=10_000, disk_max_entries=10**6)
    with open(log, "a") as out:
        batch = 0
        while True:
            last = Path(stop).exists()
            texts = [f"{name} batch {batch} text {i}" for i in range(5)]
            encoder.encode(texts)
            encoder.flush()
            out.write("\t".join(texts) + "\n")
            out.flush()
            batch += 1
            if last:
                return


def flushed_texts(log: Path) -> list[str]:
    """Texts of the batches a writer logged; a line cut short by SIGKILL (no newline) is not one."""
    lines = log.read_text().split("\n")[:-1] if log.exists() else []
    return [text for line in lines for text in line.split("\t")]


def wait_for(condition, what: str, limit_s: float = 60.0) -> None:
    deadline = time.monotonic() + limit_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def test_two_writers_and_a_killed_one_leave_every_flushed_entry(tmp_path: Path):
    cache, stop = tmp_path / "encoder-cache.sqlite", tmp_path / "stop"
    script = (
        f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        "import test_encoder_cache as t; t.write_batches(*sys.argv[1:])"
    )

    def start(name: str) -> subprocess.Popen:
        log = tmp_path / f"{name}.log"
        return subprocess.Popen([sys.executable, "-c", script, name, str(cache), str(log), str(stop)])

    victim, survivor = start("victim"), start("survivor")
    try:
        wait_for(
            lambda: len(flushed_texts(tmp_path / "survivor.log")) >= 5 * 5, "the survivor's first batches"
        )
        wait_for(lambda: len(flushed_texts(tmp_path / "victim.log")) >= 5 * 30, "the victim's batches")
        victim.send_signal(signal.SIGKILL)  # while it keeps writing: likely mid-transaction
        assert victim.wait(timeout=30) == -signal.SIGKILL
        stop.touch()
        assert survivor.wait(timeout=60) == 0
    finally:
        for process in (victim, survivor):
            if process.poll() is None:
                process.kill()
                process.wait()

    killed, survived = flushed_texts(tmp_path / "victim.log"), flushed_texts(tmp_path / "survivor.log")
    assert len(killed) >= 150 and len(survived) >= 30
    fresh = fake_encoder(NoModel(), cache_path=cache)
    texts = killed + survived
    assert np.array_equal(fresh.encode(texts), np.stack([fake_vector(t) for t in texts]))
    assert fresh.n_encoded == 0


def stored_keys(cache: Path) -> set[str]:
    with sqlite3.connect(cache) as db:
        return {key for (key,) in db.execute("SELECT key FROM embeddings")}


def test_eviction_keeps_the_table_at_its_bound_and_the_most_recently_used(tmp_path: Path):
    cache = tmp_path / "cache.sqlite"
    texts = [f"text {i}" for i in range(20)]
    encoder = fake_encoder(cache_path=cache, disk_max_entries=10)
    for start in range(0, 20, 4):
        encoder.encode(texts[start : start + 4])
        encoder.flush()
        assert len(stored_keys(cache)) == min(start + 4, 10)
    assert stored_keys(cache) == {text_key(t) for t in texts[10:]}

    # reading "text 10" (the oldest kept) makes it recent: "text 11" is evicted in its place
    model = FakeModel()
    again = fake_encoder(model, cache_path=cache, disk_max_entries=10)
    assert np.array_equal(
        again.encode(["text 10", "new text"]), np.stack([fake_vector("text 10"), fake_vector("new text")])
    )
    again.flush()
    assert model.seen == ["new text"]
    assert stored_keys(cache) == {text_key(t) for t in [*texts[10:], "new text"] if t != "text 11"}


def test_a_corrupt_cache_is_moved_aside_with_a_warning_and_replaced(tmp_path: Path, caplog):
    cache = tmp_path / "encoder-cache.sqlite"
    garbage = bytes(range(256)) * 64
    cache.write_bytes(garbage)
    encoder = fake_encoder(cache_path=cache)
    with caplog.at_level(logging.WARNING, logger="llm_auction.features.encoder"):
        assert np.array_equal(encoder.encode(["hello"]), fake_vector("hello")[None])
    assert str(cache) in caplog.text and "corrupt" in caplog.text
    (aside,) = tmp_path.glob("encoder-cache.sqlite.corrupt-*")
    assert aside.read_bytes() == garbage
    encoder.flush()
    fresh = fake_encoder(NoModel(), cache_path=cache)
    assert np.array_equal(fresh.encode(["hello"]), fake_vector("hello")[None])


def test_the_memory_lru_stays_within_its_bound(tmp_path: Path):
    texts = [f"text {i}" for i in range(12)]
    model = FakeModel()
    memory_only = fake_encoder(model, memory_max_entries=5)
    for text in texts:
        memory_only.encode([text])
        assert memory_only.n_in_memory <= 5
    memory_only.encode(texts[-5:])  # the five most recent are still held
    memory_only.encode(texts[:1])  # the oldest was evicted: encoded again
    assert model.seen == [*texts, texts[0]]

    # with a disk cache, entries waiting for a flush are flushed once as many as the bound wait
    cache = tmp_path / "cache.sqlite"
    model = FakeModel()
    on_disk = fake_encoder(model, cache_path=cache, memory_max_entries=5)
    for text in texts:
        on_disk.encode([text])
        assert on_disk.n_in_memory <= 5
    assert len(stored_keys(cache)) == 10  # two automatic flushes of five; two still wait
    assert np.array_equal(on_disk.encode(texts), np.stack([fake_vector(t) for t in texts]))
    assert model.seen == texts and on_disk.n_encoded == 12


def test_the_settings_give_the_shared_path_and_the_bounds(tmp_path: Path):
    settings = load_config(
        environ={},
        overrides={
            "data_dir": str(tmp_path),
            "features": {"encoder_cache_max_entries": 5000, "encoder_memory_max_entries": 7},
        },
    )
    encoder = encoder_for(settings)
    assert encoder.cache_path == tmp_path / "encoder-cache.sqlite"
    assert (encoder.disk_max_entries, encoder.memory_max_entries) == (5000, 7)
    with pytest.raises(ValueError, match="memory_max_entries=0"):
        TextEncoder(memory_max_entries=0)
