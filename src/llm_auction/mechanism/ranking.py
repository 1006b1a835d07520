"""The ranking stage in front of the LLM: the order in which the prompt lists a request's candidates.

A platform ranks candidates before an auction sees them, and the LLM reads its list top-down, so
the order is a signal a small policy can learn where comparing bids digit by digit is not
(`world.candidate_order: bid` moved epoch 1's candidate from 0.251 to 0.320 oracle revenue, README).
`ecpm` lists by bid x psi_t's standalone pCTR, the score the decoupled auctions rank by: only
what production has. The policy writes its markers for the listed order; `restore_markers` maps
them back to the request's own order, so that callers (the client, the logs, the metrics) never
see the permutation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llm_auction.contracts import AuctionRequest
from llm_auction.mechanism.grammar import VALID_MARKER, marker


def ecpm_order(bids: Sequence[float], pctr: Sequence[float]) -> tuple[int, ...]:
    """Candidate indices by bid x pCTR, highest first (stable: ties keep the request's order)."""
    score = np.asarray(bids, dtype=float) * np.asarray(pctr, dtype=float)
    return tuple(int(i) for i in np.argsort(-score, kind="stable"))


def listed(request: AuctionRequest, order: Sequence[int]) -> AuctionRequest:
    """The request with its candidates in `order` (listed position j holds candidate order[j])."""
    return request.model_copy(update={"ads": tuple(request.ads[i] for i in order)})


def permute_markers(response: str, mapping: Sequence[int]) -> str:
    """`[AD k]` becomes `[AD mapping[k-1]+1]`; a marker outside the mapping (a format error) stays."""

    def swap(match) -> str:  # noqa: ANN001 (re.Match)
        k = int(match.group(1))
        return marker(mapping[k - 1] + 1) if 1 <= k <= len(mapping) else match.group(0)

    return VALID_MARKER.sub(swap, response)


def restore_markers(response: str, order: Sequence[int]) -> str:
    """A response written for the listed order, in the request's own order."""
    return permute_markers(response, order)


def to_listed_markers(response: str, order: Sequence[int]) -> str:
    """A response in the request's order, written for the listed order (what the policy generated)."""
    inverse = [0] * len(order)
    for position, index in enumerate(order):
        inverse[index] = position
    return permute_markers(response, inverse)
