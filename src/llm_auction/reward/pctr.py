"""The pCTR reward model psi (LLM-Auction Eq. 3) and its BCE training (Eq. 4).

    z = W phi(.)  (one learned projection)
    p_i = sigmoid(MLP([z_x; z_y; z_h; z_a; z_x*z_a; z_h*z_a; z_c; z_c*z_a; cosines; matches; e_h; e_{a_i};
                       e_pos; numeric]))
    (with `pctr.category_affinity` also <phi(h), w_{k_i}>, a learnt vector per catalog category k_i)
    matches = (overlap(x, a_i), overlap(h, a_i), overlap(c_i, a_i)),
    overlap(s, t) = |W(s) & W(t)| / min(|W(s)|, |W(t)|)

phi is the frozen sentence encoder (query x, response y, profile text h, ad text a_i); e_h and
e_{a_i} are learnable user and ad embeddings, with index 0 for users and ads never seen (and ids
dropped to 0 at random during training, so that new ads and users are not blind: their text
still speaks). W(s) is the set of content words of a text (lower-cased word tokens, a short list
of English stopwords removed, a plural "s" folded): the classic exact-match features of ad
ranking, computed from the texts alone, so that a word the encoder blurs (a product name) still
counts, and no knowledge of how the world was generated reaches psi. c_i is the ad's lead-in, the
sentence right before its marker (`ad_context`; none when the ad opens the answer or follows another
ad): the text a reader sees on the way to the ad, the classic context feature of native ads, read
from the response alone (with `pctr.context` off, psi reads the whole response only). Position
and the other ads shown (how many, how many of the same category) let the model learn position bias and
externalities. A Platt scaling fitted on the validation split keeps the probabilities calibrated,
which the reward R = sum b_i p_i needs. The similarities (cosines, overlaps) enter standardised on the
training split, like the counts: raw cosines differ by hundredths between a relevant ad and
another, and the weights an MLP needs for such inputs are far beyond where AdamW's steps take
them in a few hundred updates (unscaled, psi's test AUC was 0.688 against 0.733 for a logistic
regression on the same similarities; standardised, 0.723).

An input frame has one row per ad impression with the columns `INPUT_COLUMNS`, plus either the
embeddings `profile_embedding`/`ad_embedding` or the texts `profile_text`/`ad_text`, plus any
click-history statistics named like `user_ctr_7d` or `ad_impressions_1d` (found by name).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llm_auction.config import PCTRConfig
from llm_auction.features.encoder import EMBEDDING_DIM, TextEncoder
from llm_auction.mechanism.grammar import parse_response, split_sentences
from llm_auction.policy.checkpoint import check_safetensors
from llm_auction.reward.metrics import auc, calibration_by, expected_calibration_error, log_loss

logger = logging.getLogger(__name__)

INPUT_COLUMNS = ("query", "response", "user_id", "ad_id", "position", "n_ads", "n_same_category")
CONTEXT_NUMERIC = ("n_ads", "n_same_category")
STAT_PATTERN = re.compile(r"^(user|ad)_(ctr|clicks|impressions)_\d+d$")
WEIGHTS, CONFIG = "model.safetensors", "pctr_config.json"
PLATT_MIN_LOG_SLOPE = -20.0  # a >= exp(-20): positive, and far from float32 underflow
N_SIMILARITIES = 6  # four embedding cosines and the two word overlaps of `text_matches`
N_CONTEXT_SIMILARITIES = 3  # the lead-in's cosine and word overlap with the ad, and whether there is one
ANY_MARKER = 10**6  # candidates when reading lead-ins: every well-formed marker counts
CHUNK_ROWS = 16_384  # impressions whose (4, 384) text embeddings are gathered at once outside training
WORD = re.compile(r"[a-z0-9]+")
# Function words of English only: a generic list, nothing picked for this world's vocabulary.
STOPWORDS = frozenset(
    "a about an and any are as at be but by can could do does for from had has have how i if in into is it"
    " its me my no not of on or our should so some than that the their them there these they this those to"
    " was we were what when where which who why will with would you your".split()
)


class PCTRNet(nn.Module):
    def __init__(
        self, n_users: int, n_ads: int, n_numeric: int, cfg: PCTRConfig, n_categories: int = 0
    ) -> None:
        super().__init__()
        # One projection of phi shared by query, response, profile and ad: few parameters to fit
        # from a few thousand clicks, and the products below compare texts in the same space.
        self.project = nn.Linear(EMBEDDING_DIM, cfg.text_dim)
        self.user = nn.Embedding(n_users + 1, cfg.id_dim)
        self.ad = nn.Embedding(n_ads + 1, cfg.id_dim)
        self.position = nn.Embedding(cfg.max_position + 1, 8)
        layers: list[nn.Module] = []
        width = 6 * cfg.text_dim + N_SIMILARITIES + 2 * cfg.id_dim + 8 + n_numeric
        self.answer_relevance = cfg.answer_relevance
        if cfg.answer_relevance:
            width += cfg.text_dim + 1
        if cfg.context:
            width += 2 * cfg.text_dim + N_CONTEXT_SIMILARITIES
        # One learnt direction of phi(profile) per catalog category, zero at first: which profiles
        # click which categories, learnt across all of a category's ads. The profile names its
        # user's tastes in words no ad uses ("clothes and style" for fashion), so neither the
        # cosines nor the projection products found them (README, pCTR).
        self.category = nn.Embedding(n_categories + 1, EMBEDDING_DIM) if cfg.category_affinity else None
        if self.category is not None:
            nn.init.zeros_(self.category.weight)
            width += 1
        for hidden in cfg.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = hidden
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(
        self,
        text: torch.Tensor,
        similarities: torch.Tensor,
        user: torch.Tensor,
        ad: torch.Tensor,
        position: torch.Tensor,
        numeric: torch.Tensor,
        category: torch.Tensor | None = None,
    ) -> torch.Tensor:
        query, response, profile, ad_text, *context = self.project(text).unbind(dim=1)
        lead_in = [context[0], context[0] * ad_text] if context else []
        answer = [query * response] if self.answer_relevance else []
        affinity = []
        if self.category is not None:
            affinity = [(text[:, 2] * self.category(category)).sum(-1, keepdim=True)]
        x = torch.cat(
            [query, response, profile, ad_text, query * ad_text, profile * ad_text, *answer, *lead_in,
             *affinity, similarities, self.user(user), self.ad(ad), self.position(position), numeric],
            dim=-1,
        )  # fmt: skip
        return self.mlp(x).squeeze(-1)


@dataclass
class Batch:
    """The model's inputs for N impressions. Texts are held once each: `texts` has one row per
    distinct embedding and `text_index` (N, 4 or 5) points each impression at its query, response,
    profile, ad and (with `pctr.context`) lead-in, so memory grows with the distinct texts, not
    6 KB an impression.
    """

    texts: torch.Tensor
    text_index: torch.Tensor
    similarities: torch.Tensor
    user: torch.Tensor
    ad: torch.Tensor
    position: torch.Tensor
    numeric: torch.Tensor
    category: torch.Tensor
    """The ad's catalog category (its row of `PCTRModel.categories` + 1; 0: unknown or not read)."""

    @property
    def text(self) -> torch.Tensor:
        """(N, 4 or 5, EMBEDDING_DIM): query, response, profile, ad (and lead-in) embeddings."""
        return self.texts[self.text_index]

    def __len__(self) -> int:
        return len(self.text_index)

    def take(self, index: np.ndarray | slice) -> Batch:
        rows = (
            self.text_index,
            self.similarities,
            self.user,
            self.ad,
            self.position,
            self.numeric,
            self.category,
        )
        return Batch(self.texts, *(t[index] for t in rows))


def _non_finite(frame: pd.DataFrame, column: str, bad_rows: np.ndarray) -> ValueError:
    return ValueError(
        f"pCTR input `{column}` has non-finite values in {int(bad_rows.sum())} of {len(frame)} rows"
        f" (first at index {frame.index[bad_rows][:5].tolist()})"
    )


def _stored_embeddings(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, np.ndarray]:
    """(distinct vectors, row -> vector) of the embeddings stored in `column`, one a row; a NaN or
    infinity in one is an error. Rows sharing a vector (the same user's or ad's) share its row.
    """
    by_object: dict[int, int] = {}  # the same object in many rows (retrieval shares them): no hashing
    by_value: dict[bytes, int] = {}
    vectors: list[np.ndarray] = []
    index = np.empty(len(frame), dtype=np.int64)
    for i, value in enumerate(frame[column]):
        j = by_object.get(id(value))
        if j is None:
            vector = np.asarray(value, dtype=np.float32)
            j = by_value.setdefault(vector.tobytes(), len(vectors))
            if j == len(vectors):
                vectors.append(vector)
            by_object[id(value)] = j
        index[i] = j
    table = np.stack(vectors) if vectors else np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
    bad = ~np.isfinite(table.reshape(len(table), -1)).all(axis=1)  # a missing vector (None) is NaN
    if bad.any():
        raise _non_finite(frame, column, bad[index])
    return table, index


def _encoded(texts: pd.Series, encoder: TextEncoder) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings of the distinct texts, row -> text): each distinct text encoded once."""
    codes, distinct = pd.factorize(texts.astype(str))
    return encoder.encode(list(distinct)), codes.astype(np.int64)


@functools.lru_cache(maxsize=1 << 14)
def _lead_ins(response: str) -> tuple[str, ...]:
    return parse_response(response, ANY_MARKER).lead_ins


def ad_context(response: str, position: int) -> str:
    """The sentence right before the ad at `position` (1-based, as the impression logs count) in
    `response`; "" when the ad opens the answer, follows another marker or is not there.
    """
    lead_ins = _lead_ins(response)
    return lead_in_sentence(lead_ins[position - 1]) if 1 <= position <= len(lead_ins) else ""


def lead_in_sentence(lead_in: str) -> str:
    """The context psi reads for an ad: the last sentence of its lead-in (`ParsedResponse.lead_ins`)."""
    sentences = split_sentences(lead_in)
    return sentences[-1] if sentences else ""


def ad_contexts(frame: pd.DataFrame) -> pd.Series:
    """Each row's lead-in: the frame's `ad_context` column where it has one (a counterfactual that
    moves an ad but keeps its text), else `ad_context` of its response and position.
    """
    if "ad_context" in frame.columns:
        return frame["ad_context"].fillna("").astype(str)
    seen: dict[tuple[str, int], str] = {}
    contexts = []
    for pair in zip(frame["response"].astype(str), frame["position"].astype(int)):
        context = seen.get(pair)
        if context is None:
            context = seen[pair] = ad_context(*pair)
        contexts.append(context)
    return pd.Series(contexts, index=frame.index, dtype=object)


def _encoded_contexts(contexts: pd.Series, encoder: TextEncoder) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings of the distinct lead-ins, row -> lead-in); no lead-in is a zero vector, so its
    cosines are 0 and the lead-in flag tells it apart.
    """
    codes, distinct = pd.factorize(contexts)
    table = np.zeros((len(distinct), EMBEDDING_DIM), dtype=np.float32)
    present = [i for i, text in enumerate(distinct) if text]
    if present:
        table[present] = encoder.encode([distinct[i] for i in present])
    return table, codes.astype(np.int64)


def _embeddings(
    frame: pd.DataFrame, column: str, text_column: str, encoder: TextEncoder
) -> tuple[np.ndarray, np.ndarray]:
    if column in frame.columns:
        return _stored_embeddings(frame, column)
    if text_column in frame.columns:
        return _encoded(frame[text_column], encoder)
    raise KeyError(f"pCTR input needs `{column}` or `{text_column}`")


def _numeric_column(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A numeric feature; missing (NaN: no history yet) is 0, but an infinity is an upstream bug."""
    if column not in frame:
        return np.zeros(len(frame))
    values = frame[column].astype(float).to_numpy()
    bad = np.isinf(values)
    if bad.any():
        raise ValueError(
            f"pCTR input `{column}` has infinite values in {int(bad.sum())} of {len(frame)} rows"
            f" (first at index {frame.index[bad][:5].tolist()})"
        )
    return np.nan_to_num(values, nan=0.0)


@functools.lru_cache(maxsize=1 << 16)
def content_words(text: str) -> frozenset[str]:
    """Lower-cased word tokens minus `STOPWORDS`; a trailing plural "s" is dropped ("flights" and
    "flight" match) from words of four letters or more that do not end in "ss".
    """
    words = (w for w in WORD.findall(text.lower()) if w not in STOPWORDS)
    return frozenset(w[:-1] if len(w) > 3 and w.endswith("s") and not w.endswith("ss") else w for w in words)


def word_overlap(first: str, second: str) -> float:
    """Overlap coefficient of the two texts' content words, in [0, 1]; 0 when either has none.

    Divided by the smaller set rather than the union (Jaccard), so that an ad's brand and
    adjectives do not dilute a short query's match.
    """
    a, b = content_words(first), content_words(second)
    return len(a & b) / min(len(a), len(b)) if a and b else 0.0


def _overlaps(first: pd.Series, second: pd.Series) -> np.ndarray:
    """`word_overlap` of each row's pair, computed once per distinct pair."""
    seen: dict[tuple[str, str], float] = {}
    values = []
    for pair in zip(first.astype(str), second.astype(str)):
        value = seen.get(pair)
        if value is None:
            value = seen[pair] = word_overlap(*pair)
        values.append(value)
    return np.asarray(values, dtype=float)


def text_matches(frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Query-ad and profile-ad word overlaps (`word_overlap`) of each row, from the public texts
    only; zeros where the ad text (or, for the second, the profile text) is not in the frame.
    """
    n = len(frame)
    if "ad_text" not in frame.columns:
        return np.zeros(n), np.zeros(n)
    query = _overlaps(frame["query"], frame["ad_text"])
    if "profile_text" not in frame.columns:
        return query, np.zeros(n)
    return query, _overlaps(frame["profile_text"], frame["ad_text"])


@dataclass
class PCTRModel:
    """psi with everything needed to score a frame: vocabularies, feature spec and calibration."""

    net: PCTRNet
    cfg: PCTRConfig
    users: list[str]
    ads: list[str]
    numeric_columns: list[str]
    numeric_mean: list[float]
    numeric_std: list[float]
    calibration: tuple[float, float] = (1.0, 0.0)
    metrics: dict[str, Any] = field(default_factory=dict)
    similarity_mean: list[float] | None = None
    """Standardisation of the similarities (train split); None: raw, as psi saved before it."""
    similarity_std: list[float] | None = None
    categories: list[str] = field(default_factory=list)
    """The ad categories seen in training (`pctr.category_affinity`); empty: psi does not read them."""

    def __post_init__(self) -> None:
        self._user_index = pd.Index(self.users)  # position + 1 is the embedding row; 0: never seen
        self._ad_index = pd.Index(self.ads)
        self._category_index = pd.Index(self.categories)

    def batch(self, frame: pd.DataFrame, encoder: TextEncoder) -> Batch:
        required = (*INPUT_COLUMNS, "category") if self.cfg.category_affinity else INPUT_COLUMNS
        missing = [c for c in required if c not in frame.columns]
        if missing:
            raise KeyError(f"pCTR input lacks columns {missing}")
        parts = [
            _encoded(frame["query"], encoder),
            _encoded(frame["response"], encoder),
            _embeddings(frame, "profile_embedding", "profile_text", encoder),
            _embeddings(frame, "ad_embedding", "ad_text", encoder),
        ]
        if self.cfg.context:
            contexts = ad_contexts(frame)
            parts.append(_encoded_contexts(contexts, encoder))
        offsets = np.cumsum([0] + [len(table) for table, _ in parts[:-1]])
        texts = np.concatenate([table for table, _ in parts]).astype(np.float32, copy=False)
        text_index = np.stack([index + offset for (_, index), offset in zip(parts, offsets)], axis=1)
        # Relevance and interest are similarities: give the MLP the products and cosines directly
        # (phi is L2-normalised), instead of asking it to learn them from a few thousand clicks;
        # the word overlaps add the exact matches. Computed a slice of rows at a time (bounded memory).
        cosines = np.empty((len(frame), 4 + self.cfg.answer_relevance + self.cfg.context), dtype=np.float32)
        for start in range(0, len(frame), CHUNK_ROWS):
            query, response, profile, ad, *lead_in = texts[text_index[start : start + CHUNK_ROWS]].transpose(
                1, 0, 2
            )
            answer = (query * response,) if self.cfg.answer_relevance else ()
            products = (
                query * ad,
                profile * ad,
                response * ad,
                query * profile,
                *answer,
                *(c * ad for c in lead_in),
            )
            cosines[start : start + CHUNK_ROWS] = np.stack([p.sum(1) for p in products], axis=1)
        similarities = [cosines, np.stack(text_matches(frame), axis=1)]
        if self.cfg.context:
            ad_text = frame["ad_text"] if "ad_text" in frame.columns else pd.Series("", index=frame.index)
            similarities.append(np.stack([_overlaps(contexts, ad_text), contexts.ne("")], axis=1))
        similarities = self.standardised(np.concatenate(similarities, axis=1))
        numeric = (
            np.stack([_numeric_column(frame, c) for c in self.numeric_columns], axis=1)
            if self.numeric_columns
            else np.zeros((len(frame), 0))
        )
        numeric = _zscores(numeric, self.numeric_mean, self.numeric_std)
        users = self._user_index.get_indexer(frame["user_id"]) + 1  # never seen (-1) -> 0
        ads = self._ad_index.get_indexer(frame["ad_id"]) + 1
        categories = (
            self._category_index.get_indexer(frame["category"]) + 1
            if self.cfg.category_affinity
            else np.zeros(len(frame), dtype=np.int64)
        )
        return Batch(
            texts=torch.from_numpy(texts),
            text_index=torch.from_numpy(text_index),
            similarities=torch.from_numpy(similarities.astype(np.float32)),
            user=torch.from_numpy(users.astype(np.int64)),
            ad=torch.from_numpy(ads.astype(np.int64)),
            position=torch.from_numpy(np.clip(frame["position"].to_numpy(int), 0, self.cfg.max_position)),
            numeric=torch.from_numpy(numeric.astype(np.float32)),
            category=torch.from_numpy(categories.astype(np.int64)),
        )

    def standardised(self, similarities: np.ndarray) -> np.ndarray:
        """The similarities as the network reads them: z-scores on the training split (raw for a psi
        saved before the standardisation).
        """
        if self.similarity_mean is None or self.similarity_std is None:
            return similarities
        return _zscores(similarities, self.similarity_mean, self.similarity_std)

    def logits(self, batch: Batch) -> torch.Tensor:
        """Uncalibrated logits; without gradients, a slice of rows at a time (bounded memory)."""
        if torch.is_grad_enabled() or len(batch) <= CHUNK_ROWS:
            return self.net(
                batch.text,
                batch.similarities,
                batch.user,
                batch.ad,
                batch.position,
                batch.numeric,
                batch.category,
            )
        return torch.cat(
            [self.logits(batch.take(slice(s, s + CHUNK_ROWS))) for s in range(0, len(batch), CHUNK_ROWS)]
        )

    @torch.inference_mode()
    def predict(self, frame: pd.DataFrame, encoder: TextEncoder) -> np.ndarray:
        """Calibrated click probability of every row."""
        if len(frame) == 0:
            return np.zeros(0)
        self.net.eval()
        a, b = self.calibration
        return torch.sigmoid(a * self.logits(self.batch(frame, encoder)) + b).numpy().astype(float)

    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        save_file(self.net.state_dict(), str(directory / WEIGHTS))
        spec = {
            "config": self.cfg.model_dump(mode="json"),
            "users": self.users,
            "ads": self.ads,
            "numeric_columns": self.numeric_columns,
            "numeric_mean": self.numeric_mean,
            "numeric_std": self.numeric_std,
            "calibration": list(self.calibration),
            "metrics": self.metrics,
            "similarity_mean": self.similarity_mean,
            "similarity_std": self.similarity_std,
            "categories": self.categories,
        }
        (directory / CONFIG).write_text(json.dumps(spec, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: Path) -> PCTRModel:
        """Load weights (safetensors only) and the spec saved beside them."""
        check_safetensors(directory)
        spec = json.loads((directory / CONFIG).read_text())
        # psi saved before `pctr.context` (`pctr.answer_relevance`, `pctr.category_affinity`) existed
        # did not read lead-ins (the answer's relevance to its query, the ads' categories).
        cfg = PCTRConfig.model_validate(
            {"context": False, "answer_relevance": False, "category_affinity": False, **spec["config"]}
        )
        categories = spec.get("categories", [])
        net = PCTRNet(
            len(spec["users"]), len(spec["ads"]), len(spec["numeric_columns"]), cfg, len(categories)
        )
        net.load_state_dict(load_file(str(directory / WEIGHTS)))
        net.eval()
        return cls(
            net, cfg, spec["users"], spec["ads"], spec["numeric_columns"], spec["numeric_mean"],
            spec["numeric_std"], tuple(spec["calibration"]), spec["metrics"],
            spec.get("similarity_mean"), spec.get("similarity_std"), categories,
        )  # fmt: skip


def _moments(values: np.ndarray) -> tuple[list[float], list[float]]:
    """Column means and deviations of the training rows (N, k): the scale psi reads an input on. A
    constant column (no history yet, no lead-ins) keeps deviation 1, so it is shifted, not blown up.
    """
    std = values.std(axis=0, ddof=1) if len(values) > 1 else np.zeros(values.shape[1])
    return values.mean(axis=0).tolist(), np.where(std > 1e-6, std, 1.0).tolist()


def _zscores(values: np.ndarray, mean: list[float], std: list[float]) -> np.ndarray:
    return (values - np.asarray(mean)) / np.asarray(std)


def split_by_request(request_ids: pd.Series, cfg: PCTRConfig) -> np.ndarray:
    """'train' / 'validation' / 'test' per row; a request's ads stay together (they interact)."""
    bucket = request_ids.map(lambda r: zlib.crc32(str(r).encode()) % 10_000 / 10_000).to_numpy()
    return np.where(
        bucket < cfg.test_fraction,
        "test",
        np.where(bucket < cfg.test_fraction + cfg.validation_fraction, "validation", "train"),
    )


def _fit_platt(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """sigmoid(a * logit + b) minimising validation log loss: calibration without touching ranking.

    The slope is fitted as a = exp(log_a), so a > 0 and psi's ranking is kept: logits that are
    anti-correlated with the clicks (a useless psi) pull a towards 0, near-flat probabilities at the
    base rate, rather than a negative a that would silently invert the ranking. log_a is clamped
    at `PLATT_MIN_LOG_SLOPE` so that a never underflows to 0. If the fit is not finite (non-finite
    logits) the identity (1, 0) is returned with a warning.

    The targets are Platt's own out-of-sample ones, (N+ + 1) / (N+ + 2) for a click and
    1 / (N- + 2) for none, not 1 and 0: on a small validation split that the logits happen to
    separate, 0/1 targets send the slope to infinity (seen: a = 67 on 24 rows, every pCTR about
    1e-9 against a 0.11 click rate, so R was flat and IRPO found no pair); on a large one the
    difference vanishes.
    """
    positives = float(labels.sum())
    negatives = float(len(labels)) - positives
    labels = torch.where(labels > 0.5, (positives + 1) / (positives + 2), 1 / (negatives + 2)).to(
        logits.dtype
    )
    log_a = torch.zeros(1, requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_a, b], lr=0.5, max_iter=100)
    loss_fn = nn.BCEWithLogitsLoss()

    def slope() -> torch.Tensor:
        return log_a.clamp(min=PLATT_MIN_LOG_SLOPE).exp()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(slope() * logits + b, labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    a, intercept = float(slope().item()), float(b.item())
    if not (np.isfinite(a) and np.isfinite(intercept)):
        logger.warning("pctr: Platt scaling did not converge (a=%s, b=%s): no calibration", a, intercept)
        return 1.0, 0.0
    return a, intercept


def evaluate(model: PCTRModel, frame: pd.DataFrame, encoder: TextEncoder) -> dict[str, Any]:
    """AUC, log loss, ECE and calibration by position on `frame` (which holds `clicked`)."""
    probs = model.predict(frame, encoder)
    labels = frame["clicked"].to_numpy(float)
    return {
        "auc": auc(labels, probs),
        "log_loss": log_loss(labels, probs),
        "ece": expected_calibration_error(labels, probs, model.cfg.calibration_bins),
        "base_rate": float(labels.mean()) if len(labels) else float("nan"),
        "mean_prediction": float(probs.mean()) if len(probs) else float("nan"),
        "n": int(len(frame)),
        "calibration_by_position": calibration_by(frame["position"].to_numpy(), labels, probs),
    }


def train_pctr(
    frame: pd.DataFrame, encoder: TextEncoder, cfg: PCTRConfig, seed: int, id_dropout: float = 0.1
) -> PCTRModel:
    """BCE training with early stopping on the validation split, then Platt scaling on it.

    Fails with a ValueError naming the cause when a split is empty, a feature is not finite
    (`PCTRModel.batch`), or the validation loss becomes non-finite (training diverged).
    """
    if frame.empty or frame["clicked"].nunique() < 2:
        raise ValueError("pctr: training needs impressions with both clicks and non-clicks")
    torch.manual_seed(seed)
    split = split_by_request(frame["request_id"], cfg)
    for name in ("train", "validation"):
        if not (split == name).any():
            raise ValueError(
                f"pctr: the {name} split is empty ({frame['request_id'].nunique()} requests, "
                f"validation_fraction={cfg.validation_fraction}, test_fraction={cfg.test_fraction}): "
                "training needs more requests"
            )
    train = frame[split == "train"]
    numeric_columns = list(CONTEXT_NUMERIC) + sorted(c for c in frame.columns if STAT_PATTERN.match(c))
    # Every row up front (`batch` checks again, split by split, for scoring): the error then counts
    # the rows of the whole frame, and no infinity reaches the normalisation statistics.
    for column in numeric_columns:
        _numeric_column(frame, column)
    for column in ("profile_embedding", "ad_embedding"):
        if column in frame.columns:
            _stored_embeddings(frame, column)
    numeric_mean, numeric_std = _moments(train[numeric_columns].astype(float).fillna(0.0).to_numpy())
    categories = sorted(train["category"].dropna().unique()) if cfg.category_affinity else []
    model = PCTRModel(
        net=PCTRNet(
            train["user_id"].nunique(), train["ad_id"].nunique(), len(numeric_columns), cfg, len(categories)
        ),
        cfg=cfg,
        users=sorted(train["user_id"].unique()),
        ads=sorted(train["ad_id"].unique()),
        categories=categories,
        numeric_columns=numeric_columns,
        numeric_mean=numeric_mean,
        numeric_std=numeric_std,
    )
    train_batch = model.batch(train, encoder)  # raw similarities: the model has no scale yet
    raw = train_batch.similarities.numpy()
    model.similarity_mean, model.similarity_std = _moments(raw)
    train_batch.similarities = torch.from_numpy(model.standardised(raw).astype(np.float32))
    data = {"train": train_batch, "validation": model.batch(frame[split == "validation"], encoder)}
    labels = {
        name: torch.tensor(frame.loc[split == name, "clicked"].to_numpy(float), dtype=torch.float32)
        for name in ("train", "validation")
    }
    optimizer = torch.optim.AdamW(model.net.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    loss_fn = nn.BCEWithLogitsLoss()
    rng = np.random.default_rng(seed)
    best = (float("inf"), None, 0)
    history = []
    for epoch in range(cfg.max_epochs):
        model.net.train()
        order = rng.permutation(len(labels["train"]))
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = data["train"].take(idx)
            drop = torch.from_numpy(rng.random((2, len(idx))) < id_dropout)
            batch.user = batch.user.masked_fill(drop[0], 0)
            batch.ad = batch.ad.masked_fill(drop[1], 0)
            loss = loss_fn(model.logits(batch), labels["train"][idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.net.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(model.logits(data["validation"]), labels["validation"]))
        if not np.isfinite(val_loss):
            # The inputs were checked finite in `model.batch`: the weights diverged.
            raise ValueError(
                f"pctr: validation log loss is {val_loss} at epoch {epoch + 1} (learning_rate="
                f"{cfg.learning_rate}, weight_decay={cfg.weight_decay}); the input features are finite, "
                "so training diverged: lower pctr.learning_rate"
            )
        history.append(val_loss)
        logger.info("pctr epoch %d: validation log loss %.4f", epoch + 1, val_loss)
        if val_loss < best[0] - 1e-5:
            best = (val_loss, {k: v.clone() for k, v in model.net.state_dict().items()}, epoch + 1)
        elif epoch + 1 - best[2] >= cfg.patience:
            break
    model.net.load_state_dict(best[1])
    model.net.eval()
    with torch.no_grad():
        model.calibration = _fit_platt(model.logits(data["validation"]), labels["validation"])
    model.metrics = {
        "epochs": len(history),
        "best_epoch": best[2],
        "validation_log_loss_curve": history,
        "n_train": int(len(train)),
        "n_validation": int((split == "validation").sum()),
        "test": evaluate(model, frame[split == "test"], encoder),
    }
    return model
