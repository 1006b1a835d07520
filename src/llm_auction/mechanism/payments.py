"""First-price pay-per-click: an advertiser pays its own bid for each click, nothing per impression."""

from __future__ import annotations

import numpy as np


def payment_per_click(bids: np.ndarray) -> np.ndarray:
    """What each advertiser pays when its ad is clicked: its bid (first price)."""
    return np.asarray(bids, dtype=float)


def expected_payments(bids: np.ndarray, ctr: np.ndarray) -> np.ndarray:
    """Expected payment of each shown ad: b_i * CTR_i (or b_i * click_i for realized clicks)."""
    return payment_per_click(bids) * np.asarray(ctr, dtype=float)
