"""Which arm answers a user while a challenger is in canary: a stable hash of the user.

The user, not the request, is the unit: a user sees one policy for the whole canary (no flicker
between two auctions, and the arms' users do not overlap). The salt is the challenger's version,
so each canary draws its own users instead of the same share of users testing every candidate.
"""

from __future__ import annotations

import hashlib

from llm_auction.evaluation.canary import CHALLENGER, CHAMPION

BUCKETS = 10_000


def bucket(user_id: str, salt: str) -> int:
    """The user's bucket in 0..9999 (SHA-256: stable across processes and Python versions)."""
    digest = hashlib.sha256(f"{salt}\x1f{user_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def arm_for(user_id: str, canary_percent: float, salt: str) -> str:
    """`challenger` for `canary_percent` percent of users, `champion` for the others."""
    return CHALLENGER if bucket(user_id, salt) < canary_percent * BUCKETS / 100 else CHAMPION
