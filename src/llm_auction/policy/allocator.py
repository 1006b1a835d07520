"""The policy as an allocation rule: prompt -> sampled response, the auction itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from llm_auction.contracts import AuctionRequest
from llm_auction.errors import UnknownEntityError
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


@dataclass
class LLMPolicy:
    """One sampled response per request; `rng` seeds the sampler so runs repeat."""

    generator: Generator
    profiles: Mapping[str, str]
    name: str = "policy"

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]:
        samples = self.generator.generate(prompts_for(requests, self.profiles), 1, int(rng.integers(2**31)))
        return [group[0] for group in samples]

    def sample(self, requests: Sequence[AuctionRequest], n: int, seeds: Sequence[int]) -> list[list[str]]:
        """`n` responses per request, each request from its own seed, in one batch (`SampledAllocator`)."""
        return self.generator.generate(prompts_for(requests, self.profiles), n, list(seeds))
