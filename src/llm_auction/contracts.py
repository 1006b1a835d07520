"""The auction request and the interfaces around it, shared by the CLI, the simulator and serving."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class AdCandidate(BaseModel):
    """One candidate ad with its advertiser's bid per click."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ad_id: str = Field(min_length=1, max_length=128)
    advertiser_id: str = Field(min_length=1, max_length=128)
    text: str = Field(min_length=1, max_length=1000)
    bid: float = Field(gt=0.0, description="Bid per click; first price: the payment per click.")

    @field_validator("bid")
    @classmethod
    def _finite(cls, bid: float) -> float:
        if not math.isfinite(bid):
            raise ValueError("must be a finite number")
        return bid


class AuctionRequest(BaseModel):
    """A user's query with K candidate ads; the response may insert up to `max_ads` of them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    request_id: str = Field(min_length=1, max_length=128)
    user_id: str = Field(min_length=1, max_length=128)
    query: str = Field(min_length=1, max_length=2000)
    ads: tuple[AdCandidate, ...] = Field(min_length=1, max_length=64)
    max_ads: int | None = Field(None, ge=0, le=64)

    @model_validator(mode="after")
    def _unique_ads(self) -> AuctionRequest:
        seen: set[str] = set()
        for ad in self.ads:
            if ad.ad_id in seen:
                raise ValueError(f"ads: duplicate ad_id {ad.ad_id!r}")
            seen.add(ad.ad_id)
        return self

    def ad_limit(self, default: int | None) -> int | None:
        """Most ads the response may insert: the request's own `max_ads` (0 included), else `default`
        (None: no limit).
        """
        return self.max_ads if self.max_ads is not None else default

    @property
    def bids(self) -> tuple[float, ...]:
        return tuple(ad.bid for ad in self.ads)

    def with_bid(self, index: int, bid: float) -> AuctionRequest:
        """The same request with candidate `index` bidding `bid` (audits raise one bid)."""
        ads = list(self.ads)
        ads[index] = AdCandidate.model_validate({**ads[index].model_dump(), "bid": bid})
        return self.model_copy(update={"ads": tuple(ads)})


def check_bid_cap(request: AuctionRequest, max_bid: float) -> None:
    """Reject bids above the configured cap; the error names the field."""
    for i, ad in enumerate(request.ads):
        if ad.bid > max_bid:
            raise ValueError(f"ads.{i}.bid: {ad.bid} exceeds the maximum bid {max_bid}")


CtrEstimator = Callable[[Sequence[AuctionRequest]], list[np.ndarray]]
"""requests -> the pCTR of each candidate of each request (one call per batch: psi scores in one pass)."""


class Allocator(Protocol):
    """An allocation rule: writes one response (in the grammar of `mechanism.grammar`) per request.

    Baselines and the LLM policy alike; a stochastic rule draws from `rng` so that runs repeat.
    """

    name: str

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]: ...


@runtime_checkable
class SampledAllocator(Allocator, Protocol):
    """A sampled rule that also draws `n` responses for each of many requests in one batch, each
    request from its own seed: its samples do not depend on the requests batched with it.

    The audits batch with it (an LLM samples thousands of prompts in one call far faster than in
    hundreds of small ones) and keep common random numbers: requests that share a seed share a stream.
    """

    def sample(self, requests: Sequence[AuctionRequest], n: int, seeds: Sequence[int]) -> list[list[str]]: ...


class ClickModel(Protocol):
    """Gives the probability that the user clicks each ad inserted in a response.

    The simulator's users implement it with the hidden truth; production with the learned pCTR
    (`reward.scorer.PCTRClickModel`), so the same audits run on either side.
    """

    def expected_ctr(
        self, request: AuctionRequest, allocation: Sequence[int], response: str | None = None
    ) -> np.ndarray:
        """Click probability of each inserted ad, in allocation order (position 1 first).

        Args:
            request: the auction request the response answers.
            allocation: 0-based candidate indices in the order they appear in the response.
            response: the response text, for models that read it; may be None.
        """
        ...
