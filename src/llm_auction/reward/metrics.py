"""Quality of a click-probability model: ranking (AUC), fit (log loss) and calibration (ECE)."""

from __future__ import annotations

import numpy as np
import pandas as pd


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties get their average rank)."""
    labels = np.asarray(labels, dtype=bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(np.asarray(scores, dtype=float)).rank(method="average").to_numpy()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
    p = np.clip(np.asarray(probs, dtype=float), eps, 1 - eps)
    y = np.asarray(labels, dtype=float)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray, n_bins: int = 10) -> float:
    """Mean |predicted - observed| over equal-width probability bins, weighted by bin size."""
    probs = np.asarray(probs, dtype=float)
    labels = np.asarray(labels, dtype=float)
    bins = np.minimum((probs * n_bins).astype(int), n_bins - 1)
    error = 0.0
    for b in np.unique(bins):
        mask = bins == b
        error += mask.mean() * abs(probs[mask].mean() - labels[mask].mean())
    return float(error)


def calibration_by(groups: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> dict[str, dict[str, float]]:
    """Mean prediction against observed rate within each group (e.g. each position)."""
    frame = pd.DataFrame({"group": groups, "label": labels, "prob": probs})
    out = {}
    for group, part in frame.groupby("group"):
        out[str(group)] = {
            "predicted": float(part["prob"].mean()),
            "observed": float(part["label"].mean()),
            "n": int(len(part)),
        }
    return out
