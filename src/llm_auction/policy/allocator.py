"""The policy as an allocation rule: prompt -> sampled response, the auction itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llm_auction.contracts import AuctionRequest, CtrEstimator
from llm_auction.errors import UnknownEntityError
from llm_auction.mechanism.ranking import ecpm_order, listed, restore_markers
from llm_auction.policy.generation import Generator
from llm_auction.policy.prompt import build_prompt


def prompts_for(requests: Sequence[AuctionRequest], profiles: Mapping[str, str]) -> list[str]:
    """Prompts with each request's user profile; an unknown user is an error naming the field."""
    out = []
    for request in requests:
        if request.user_id not in profiles:
            raise UnknownEntityError(f"user_id: unknown user {request.user_id!r}")
        out.append(build_prompt(request, profiles[request.user_id]))
    return out


def rank_requests(
    requests: Sequence[AuctionRequest], ranker: CtrEstimator | None
) -> tuple[list[AuctionRequest], list[tuple[int, ...]]]:
    """Each request as the prompt lists it (by bid x `ranker`'s pCTR; None: as given), and its order."""
    if ranker is None:
        return list(requests), [tuple(range(len(r.ads))) for r in requests]
    return listed_by_ecpm(requests, ranker(requests))


def listed_by_ecpm(
    requests: Sequence[AuctionRequest], pctr: Sequence[Sequence[float]]
) -> tuple[list[AuctionRequest], list[tuple[int, ...]]]:
    """Each request listed by bid x its candidates' pCTR (`pctr[i]`, request order), and its order."""
    orders = [ecpm_order(r.bids, p) for r, p in zip(requests, pctr, strict=True)]
    return [listed(r, o) for r, o in zip(requests, orders, strict=True)], orders


@dataclass
class LLMPolicy:
    """One sampled response per request; `rng` seeds the sampler so runs repeat.

    With a `ranker` (`policy.ranking: ecpm`) the prompt lists the candidates by bid x pCTR and the
    responses come back in the request's own order: the ranking stage is part of the rule (a
    doubled bid moves its ad up the list), invisible to whoever reads the responses.
    """

    generator: Generator
    profiles: Mapping[str, str]
    name: str = "policy"
    ranker: CtrEstimator | None = None

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]:
        return [group[0] for group in self._generate(requests, 1, int(rng.integers(2**31)))]

    def sample(self, requests: Sequence[AuctionRequest], n: int, seeds: Sequence[int]) -> list[list[str]]:
        """`n` responses per request, each request from its own seed, in one batch (`SampledAllocator`)."""
        return self._generate(requests, n, list(seeds))

    def _generate(self, requests: Sequence[AuctionRequest], n: int, seed: int | list[int]) -> list[list[str]]:
        shown, orders = rank_requests(requests, self.ranker)
        samples = self.generator.generate(prompts_for(shown, self.profiles), n, seed)
        if self.ranker is None:
            return samples
        return [[restore_markers(y, o) for y in group] for group, o in zip(samples, orders, strict=True)]
