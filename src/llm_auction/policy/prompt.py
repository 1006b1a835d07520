"""The one prompt template shared by SFT, sampling, DPO and serving.

    profile: <user profile h>
    query: <query x>
    topic: <the catalog topic the query names, when it names one>
    ads:
    [AD 1] <ad text> | bid 1.25
    [AD 2] <ad text> | bid 0.40
    answer:

followed by a space and the response, which inserts ad k with the marker `[AD k]`
(`llm_auction.mechanism.grammar`). Each ad is listed under the very marker that inserts it, so
inserting an ad is copying a token from the prompt (one token: the tokenizer keeps markers whole),
which even a tiny model learns quickly. Bids are written with two decimals; the tokenizer splits
digits, so a bid costs a handful of tokens and the model can compare them digit by digit.
The topic line is the platform's reading of the query's words (`text.reading.topic_of`, what the
decoupled auctions' organic writer answers about): a tiny model that must infer it from the query
answers a neighbouring topic now and then, and such an answer fails the user.
"""

from __future__ import annotations

from llm_auction.contracts import AuctionRequest
from llm_auction.mechanism.grammar import marker
from llm_auction.text.reading import topic_of

ANSWER_CUE = "answer:"
PROMPT_FORMAT = 2
"""The template's version, kept in every policy card (`policy.model.check_prompt_format`): 1 had no
topic line (before commit 310903b), 2 has it. Change it with any change to what the prompt says."""


def format_bid(bid: float) -> str:
    return f"{bid:.2f}"


def build_prompt(request: AuctionRequest, profile: str) -> str:
    """The prompt for one request; `profile` is the user's profile text (h)."""
    topic = topic_of(request.query)
    lines = [f"profile: {profile}", f"query: {request.query}"]
    lines += [f"topic: {topic.name}"] if topic is not None else []
    lines.append("ads:")
    lines += [
        f"{marker(k)} {ad.text} | bid {format_bid(ad.bid)}" for k, ad in enumerate(request.ads, start=1)
    ]
    lines.append(ANSWER_CUE)
    return "\n".join(lines)
