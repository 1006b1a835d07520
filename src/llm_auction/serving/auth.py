"""Bearer-token check shared by the model server and the feedback collector."""

from __future__ import annotations

import hmac


def bearer_ok(header: str | None, token: str) -> bool:
    """Whether an `Authorization` header value is exactly `Bearer <token>`.

    Compared with `hmac.compare_digest` on the UTF-8 bytes, so the time taken does not reveal how
    many leading characters of a guess were right (a plain `!=` stops at the first difference).
    Only a token's length can leak, as with any constant-time comparison.
    """
    if header is None:
        return False
    return hmac.compare_digest(header.encode("utf-8"), f"Bearer {token}".encode())
