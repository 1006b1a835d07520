"""Preference pairs of IRPO: winner = argmax R, losers = every response more than delta_th below it.

Eq. 6 averages the DPO loss over a prompt's losers, then over prompts. A pair set flattens that
into one row per (winner, loser) with a `weight` = n_pairs / (n_prompts * |S_prompt|): the plain
mean of weight * loss over all rows is then exactly Eq. 6, and a uniformly sampled mini-batch gives
an unbiased estimate of it (see `irpo.dpo`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

PAIRS_FILE = "pairs.parquet"
SAMPLES_FILE = "samples.parquet"
STATS_FILE = "pairs_stats.json"


def file_digest(path: Path) -> str:
    """A pairs file's short SHA-256: the lineage that ties a DPO run to the pairs it read."""
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


PAIR_COLUMNS = [
    "request_id",
    "prompt",
    "chosen",
    "rejected",
    "reward_chosen",
    "reward_rejected",
    "gap",
    "n_losers",
    "weight",
]


@dataclass(frozen=True)
class Preference:
    """The winner of one prompt's samples and its losers (indices into the samples)."""

    winner: int
    losers: tuple[int, ...]


def select_pairs(rewards: Sequence[float], delta_th: float) -> Preference | None:
    """Winner = the first argmax of R; losers S = {l : r_w - r_l > delta_th}; None when S is empty.

    A strict inequality: a gap of exactly delta_th is no preference, and tied samples never pair.
    """
    values = np.asarray(rewards, dtype=float)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError("rewards: need at least one finite reward per prompt")
    winner = int(np.argmax(values))
    losers = tuple(int(i) for i in np.flatnonzero(values[winner] - values > delta_th))
    return Preference(winner, losers) if losers else None


def build_pairs(
    request_ids: Sequence[str],
    prompts: Sequence[str],
    samples: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]],
    delta_th: float,
) -> pd.DataFrame:
    """The pair set of one epoch: one row per (prompt, loser) with both rewards, the gap and the weight."""
    rows: list[dict[str, Any]] = []
    for request_id, prompt, responses, scores in zip(request_ids, prompts, samples, rewards, strict=True):
        if len(responses) != len(scores):
            raise ValueError(f"request {request_id}: {len(responses)} responses but {len(scores)} rewards")
        preference = select_pairs(scores, delta_th)
        if preference is None:
            continue
        for loser in preference.losers:
            rows.append(
                {
                    "request_id": request_id,
                    "prompt": prompt,
                    "chosen": responses[preference.winner],
                    "rejected": responses[loser],
                    "reward_chosen": float(scores[preference.winner]),
                    "reward_rejected": float(scores[loser]),
                    "gap": float(scores[preference.winner] - scores[loser]),
                    "n_losers": len(preference.losers),
                }
            )
    pairs = pd.DataFrame(rows, columns=PAIR_COLUMNS[:-1])
    n_prompts = pairs["request_id"].nunique()
    pairs["weight"] = len(pairs) / (n_prompts * pairs["n_losers"]) if len(pairs) else pd.Series(dtype=float)
    return pairs


def pair_statistics(pairs: pd.DataFrame, n_prompts: int) -> dict[str, float]:
    """What the pair set says about the epoch: how many prompts taught something, and how clearly."""
    per_prompt = pairs.groupby("request_id").size() if len(pairs) else pd.Series(dtype=float)
    gaps = pairs["gap"].to_numpy(float) if len(pairs) else np.array([np.nan])
    return {
        "prompts": float(n_prompts),
        "pairs": float(len(pairs)),
        "prompts_with_pairs": float(len(per_prompt)),
        "share_prompts_without_pair": 1.0 - len(per_prompt) / n_prompts if n_prompts else float("nan"),
        "pairs_per_prompt_mean": float(per_prompt.mean()) if len(per_prompt) else 0.0,
        "pairs_per_prompt_max": float(per_prompt.max()) if len(per_prompt) else 0.0,
        "gap_mean": float(np.mean(gaps)),
        "gap_p10": float(np.quantile(gaps, 0.1)),
        "gap_p50": float(np.quantile(gaps, 0.5)),
        "gap_p90": float(np.quantile(gaps, 0.9)),
        "reward_chosen_mean": float(pairs["reward_chosen"].mean()) if len(pairs) else float("nan"),
        "reward_rejected_mean": float(pairs["reward_rejected"].mean()) if len(pairs) else float("nan"),
    }


def read_pairs(path: Path) -> pd.DataFrame:
    """A pair set written by `the build_preferences step` (a folder or the parquet file itself)."""
    file = path / PAIRS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"pairs {path}: no {PAIRS_FILE} found; run `llm-auction irpo pairs` first")
    return pd.read_parquet(file)
