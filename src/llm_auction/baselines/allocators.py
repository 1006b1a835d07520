"""The non-LLM allocation baselines, each an `Allocator` writing responses in the marker grammar.

- `no_ads`: organic text only.
- `random`: 0..`random_max_ads` candidates at random slots (bid-blind).
- `pre_generation`: auction first (rank by bid * pCTR, keep the top `max_ads`), then write the answer
  around the winners, best first, leading up to `pre_generation_bridges` winners that are off the
  query's topic with a bridge sentence (`text.reading.bridge_for`) so they read as native.
- `post_generation`: write the answer first, then auction its fixed slots (after the first sentence,
  then at the end, ...) by bid * pCTR; the text is written before the ads, so nothing bridges them.
- `reward_greedy`: write the answer first, then search its layouts under the reward R (psi_t's
  page-aware pCTR): how many ads, which of the best-ranked, in which order, and which are led in by
  a bridge. The deployable mirror of the oracle's `oracle_greedy`; an IRPO anchor (`irpo.anchors`).

These are deployable: pre- and post-generation rank with a `CtrEstimator` that production has,
psi_t's standalone pCTR (`reward.scorer.RewardScorer.standalone_pctr`), the same pCTR the policy
is rewarded with; `reward_greedy` also prices its layouts with that R. The upper references priced
with the simulator's truth (`pre_generation@oracle`, `post_generation@oracle`, `oracle_greedy`)
live on the oracle side, `simulator.references`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from llm_auction.config import Settings
from llm_auction.contracts import Allocator, AuctionRequest, CtrEstimator
from llm_auction.mechanism.grammar import render_response
from llm_auction.text.bank import Topic
from llm_auction.text.organic import organic_answer
from llm_auction.text.reading import bridge_for, text_relevance, topic_of

if TYPE_CHECKING:  # names only: the scorer's torch, transformers and Feast load with psi, not here
    from llm_auction.reward.scorer import RewardScorer, Scorer

BASELINES = ("no_ads", "random", "pre_generation", "post_generation", "reward_greedy")
PRICED = ("pre_generation", "post_generation", "reward_greedy")
"""The baselines that price with psi_t: they need a `RewardScorer`."""


def spread_slots(n_ads: int, n_sentences: int) -> list[int]:
    """Slots for `n_ads` ads in reading order: after the first sentence, then evenly to the end."""
    if n_ads == 0:
        return []
    return [int(s) for s in np.linspace(1, n_sentences, n_ads).round()]


def off_topic_bridge(topic: Topic | None, ad_text: str) -> str | None:
    """The bridge that makes an ad off the query's `topic` read as native; None for an ad on the
    topic (native after the answer's own sentences already) or one that names no product.
    """
    return bridge_for(ad_text) if text_relevance(topic, ad_text) < 1 else None


def limit_of(request: AuctionRequest, max_ads: int) -> int:
    return max_ads if request.max_ads is None else min(max_ads, request.max_ads)


@dataclass
class NoAds:
    n_sentences: int
    name: str = "no_ads"

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]:
        return [render_response(organic_answer(r.query, self.n_sentences, rng), []) for r in requests]


@dataclass
class RandomInsertion:
    n_sentences: int
    max_ads: int
    name: str = "random"

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]:
        out = []
        for r in requests:
            sentences = organic_answer(r.query, self.n_sentences, rng)
            n = int(rng.integers(0, min(limit_of(r, self.max_ads), len(r.ads)) + 1))
            chosen = rng.permutation(len(r.ads))[:n]
            slots = sorted(int(s) for s in rng.integers(0, len(sentences) + 1, n))
            out.append(render_response(sentences, list(zip(slots, (int(i) for i in chosen)))))
        return out


@dataclass
class PreGeneration:
    ctr_estimator: CtrEstimator
    n_sentences: int
    max_ads: int
    max_bridges: int = 0
    name: str = "pre_generation"

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]:
        out = []
        for r, ctr in zip(requests, self.ctr_estimator(requests), strict=True):
            score = np.asarray(r.bids) * ctr
            winners = [int(i) for i in np.argsort(-score, kind="stable")[: limit_of(r, self.max_ads)]]
            sentences = organic_answer(r.query, self.n_sentences, rng)
            placements = list(zip(spread_slots(len(winners), len(sentences)), winners))
            out.append(render_response(sentences, placements, self._bridges(r, winners)))
        return out

    def _bridges(self, request: AuctionRequest, winners: Sequence[int]) -> dict[int, str]:
        """Bridges for the best-ranked winners that are off the query's topic (at most `max_bridges`)."""
        topic = topic_of(request.query)
        leads: dict[int, str] = {}
        for i in winners:
            if len(leads) < self.max_bridges and (b := off_topic_bridge(topic, request.ads[i].text)):
                leads[i] = b
        return leads


@dataclass
class PostGeneration:
    ctr_estimator: CtrEstimator
    n_sentences: int
    slots: int
    name: str = "post_generation"

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]:
        out = []
        for r, ctr in zip(requests, self.ctr_estimator(requests), strict=True):
            sentences = organic_answer(r.query, self.n_sentences, rng)
            slots = spread_slots(min(limit_of(r, self.slots), len(r.ads)), len(sentences))
            score = np.asarray(r.bids) * ctr
            winners = [int(i) for i in np.argsort(-score, kind="stable")[: len(slots)]]
            out.append(render_response(sentences, list(zip(slots, winners))))
        return out


@dataclass
class RewardGreedy:
    """Post-generation that searches its layouts under R instead of filling fixed slots.

    Among the `pool` candidates ranked best by bid x standalone pCTR, every ordered set of 0 to
    `max_ads` ads in `spread_slots` places, each ad off the query's topic that names a product with
    or without its bridge (`bridges`), is written out and scored by `reward`; the best is the answer. R reads
    the page (positions, the other ads, the sentence before each marker), so the search weighs what
    a second ad or a bridge takes from the first against what it brings, as far as psi_t has
    learned it. psi encodes each page's whole text, so every layout costs an encoding: a small pool.
    """

    ctr_estimator: CtrEstimator
    reward: Scorer
    n_sentences: int
    max_ads: int
    pool: int = 2
    bridges: bool = True
    name: str = "reward_greedy"

    def allocate(self, requests: Sequence[AuctionRequest], rng: np.random.Generator) -> list[str]:
        layouts = [
            list(self._layouts(r, ctr, organic_answer(r.query, self.n_sentences, rng)))
            for r, ctr in zip(requests, self.ctr_estimator(requests), strict=True)
        ]
        flat = [(r, y) for r, ys in zip(requests, layouts, strict=True) for y in ys]
        rewards = self.reward([r for r, _ in flat], [y for _, y in flat]) if flat else np.array([])
        out, start = [], 0
        for ys in layouts:
            out.append(ys[int(np.argmax(rewards[start : start + len(ys)]))])
            start += len(ys)
        return out

    def _layouts(self, request: AuctionRequest, ctr: np.ndarray, sentences: list[str]) -> Iterator[str]:
        """Every layout of the search, the empty page first (so ties keep fewer ads)."""
        ranked = np.argsort(-np.asarray(request.bids) * ctr, kind="stable")[: self.pool]
        topic = topic_of(request.query)
        bridges = {
            int(i): off_topic_bridge(topic, request.ads[i].text) if self.bridges else None for i in ranked
        }
        yield render_response(sentences, [])
        for n in range(1, min(limit_of(request, self.max_ads), len(ranked)) + 1):
            slots = spread_slots(n, len(sentences))
            for order in itertools.permutations((int(i) for i in ranked), n):
                choices = [(False, True) if bridges[i] else (False,) for i in order]
                for led in itertools.product(*choices):
                    leads = {i: str(bridges[i]) for i, lead in zip(order, led) if lead}
                    yield render_response(sentences, list(zip(slots, order)), leads)


def make_baseline(name: str, settings: Settings, scorer: RewardScorer | None = None) -> Allocator:
    """Build a deployable baseline by name; the priced ones (`PRICED`) need psi_t's `scorer`."""
    b, max_ads = settings.baselines, settings.mechanism.max_ads
    if name in PRICED and scorer is None:
        raise ValueError(f"policy: {name} prices with pCTR; it needs a trained pCTR (--pctr DIR)")
    ctr_estimator = scorer.standalone_pctr if scorer else None
    builders: dict[str, Callable[[], Allocator]] = {
        "no_ads": lambda: NoAds(b.organic_sentences),
        "random": lambda: RandomInsertion(b.organic_sentences, min(b.random_max_ads, max_ads)),
        "pre_generation": lambda: PreGeneration(
            ctr_estimator, b.organic_sentences, max_ads, b.pre_generation_bridges
        ),
        "post_generation": lambda: PostGeneration(
            ctr_estimator, b.organic_sentences, b.post_generation_slots
        ),
        "reward_greedy": lambda: RewardGreedy(
            ctr_estimator,
            scorer,
            b.organic_sentences,
            b.reward_greedy_max_ads,
            b.reward_greedy_pool,
            b.reward_greedy_bridges,
        ),
    }
    if name not in builders:
        raise ValueError(f"policy: unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return builders[name]()
