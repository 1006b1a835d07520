"""The one prompt template shared by SFT, sampling, DPO and serving.

    profile: <user profile h>
    query: <query x>
    ads:
    [AD 1] <ad text> | bid 1.25
    [AD 2] <ad text> | bid 0.40
    answer:

followed by a space and the response, which inserts ad k with the marker `[AD k]`
(`llm_auction.mechanism.grammar`). Each ad is listed under the very marker that inserts it, so
inserting an ad is copying a token from the prompt (one token: the tokenizer keeps markers whole),
which even a tiny model learns quickly. Bids are written with two decimals; the tokenizer splits
digits, so a bid costs a handful of tokens and the model can compare them digit by digit.
"""

from __future__ import annotations

from llm_auction.contracts import AuctionRequest
from llm_auction.mechanism.grammar import marker

ANSWER_CUE = "answer:"


def format_bid(bid: float) -> str:
    return f"{bid:.2f}"


def build_prompt(request: AuctionRequest, profile: str) -> str:
    """The prompt for one request; `profile` is the user's profile text (h)."""
    lines = [f"profile: {profile}", f"query: {request.query}", "ads:"]
    lines += [
        f"{marker(k)} {ad.text} | bid {format_bid(ad.bid)}" for k, ad in enumerate(request.ads, start=1)
    ]
    lines.append(ANSWER_CUE)
    return "\n".join(lines)
