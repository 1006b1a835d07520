"""The parametric click model: what a simulated user clicks, from ground truth hidden in the world.

For ad i shown at position k among the n ads of a response:

    base_i = sigmoid(intercept + w_rel * relevance(query, ad_i) + w_int * interest(user, ad_i)
                     + w_q * (2 * quality_i - 1))
    ctr_i  = base_i * decay^(k-1)                                  position bias
                    * (1 - gamma_same)^(same-category others)      competition for attention
                    * (1 - gamma_other)^(other-category others)
                    * (1 - fatigue)^max(0, n - free_ads)           ad-load fatigue
                    * (h + (1 - h) * native_i)                     nativeness
                    * (1 - penalty)^max(0, floor - useful)         answer quality
                    * flood(share)                                 ads and ad talk crowding the answer

relevance is 1 for the query's own topic, 0.5 for another topic of its category, 0 otherwise;
interest is the user's interest in the ad's category relative to their strongest interest.

The text terms read the response (`text.reading`):

- native_i: the sentence right before the ad's marker is about the ad's own topic (1: a native ad,
  e.g. after a bridge naming its product, or an on-topic ad after a tip on the query), about
  another topic of its category (0.5), or about anything else, or there is none because the marker
  opens the answer or follows another marker (0: a hard ad). h = `hard_ad_factor`, so with the
  default 0.5 a native ad gets twice a hard one's clicks.
- useful: distinct sentences on the query's topic that are not bridges; fewer than `quality_floor`
  lowers every ad's clicks.
- share = (n + ad talk) / (n + sentences), ad talk being every sentence that does not address the
  query (bridges included); flood(s) = 1 up to `flood_threshold`, then
  ((1 - s) / (1 - threshold))^`flood_power`, falling to 0 when ads and ad talk are all there is.

The user's own utility of the answer, a term of social welfare, is
`user_weight * min(useful, floor) / floor * (1 - share)`: a useful answer, less so when crowded.
Without a response text an allocation is read as a plain answer: each ad after a sentence on the
query's topic (native by relevance), the answer useful and not flooded.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from llm_auction.config import ClickModelConfig
from llm_auction.contracts import AuctionRequest
from llm_auction.simulator.base import UnknownEntityError
from llm_auction.text.reading import Layout, category_of, is_bridge, product_of, read_layout, sentence_topic
from llm_auction.world import CATEGORY_NAMES, World

SAME_TOPIC, SAME_CATEGORY = 1.0, 0.5


@dataclass(frozen=True)
class Answer:
    """What the user takes from an answer's sentences (its ads aside)."""

    useful: int
    """Distinct sentences that address the query (on its topic, not a bridge)."""
    talk: int
    """Sentences that do not address it: bridges and other ad talk."""
    sentences: int
    """All sentences (repeats of a useful one are neither useful again nor ad talk)."""


@dataclass(frozen=True)
class OracleLayout:
    """The oracle's best answer: ads in order, which ones get a bridge, expected weighted clicks."""

    order: tuple[int, ...]
    bridged: tuple[bool, ...]
    value: float


class ParametricClickModel:
    """Expected CTR and clicks from the world's hidden ground truth."""

    def __init__(self, world: World, cfg: ClickModelConfig) -> None:
        self.cfg = cfg
        cat_index = {name: i for i, name in enumerate(CATEGORY_NAMES)}
        self._ads = {
            row.ad_id: (cat_index[row.category], row.topic, float(row.quality))
            for row in world.ads.itertuples(index=False)
        }
        self._queries = {
            row.text: (cat_index[row.category], row.topic) for row in world.queries.itertuples(index=False)
        }
        self._interest = {}
        for row in world.users.itertuples(index=False):
            weights = np.asarray(row.interests, dtype=float)
            self._interest[row.user_id] = weights / max(weights.max(), 1e-12)

    def _query(self, request: AuctionRequest) -> tuple[int, str]:
        try:
            return self._queries[request.query]
        except KeyError:
            raise UnknownEntityError(f"query: no ground truth for {request.query!r}") from None

    def _lookup(self, request: AuctionRequest, indices: Sequence[int]) -> tuple[np.ndarray, ...]:
        query_cat, query_topic = self._query(request)
        try:
            interest = self._interest[request.user_id]
        except KeyError:
            raise UnknownEntityError(f"user_id: unknown user {request.user_id!r}") from None
        cats, relevance, quality = [], [], []
        for i in indices:
            ad_id = request.ads[i].ad_id
            if ad_id not in self._ads:
                raise UnknownEntityError(f"ads.{i}.ad_id: unknown ad {ad_id!r}")
            cat, topic, q = self._ads[ad_id]
            cats.append(cat)
            quality.append(q)
            relevance.append(self._match(cat, topic, query_cat, query_topic))
        cats_arr = np.asarray(cats, dtype=int)
        return cats_arr, np.asarray(relevance), interest[cats_arr], np.asarray(quality)

    @staticmethod
    def _match(cat: int, topic: str, other_cat: int, other_topic: str) -> float:
        """1 for the same topic, 0.5 for another topic of the same category, else 0."""
        if cat != other_cat:
            return 0.0
        return SAME_TOPIC if topic == other_topic else SAME_CATEGORY

    def _nativeness(self, ad_id: str, context: str | None) -> float:
        """How well the sentence before an ad introduces it (1 native ... 0 hard)."""
        topic = None if context is None else sentence_topic(context)
        if topic is None:
            return 0.0
        cat, ad_topic, _ = self._ads[ad_id]
        return self._match(cat, ad_topic, CATEGORY_NAMES.index(category_of(topic).name), topic.name)

    def read_answer(self, request: AuctionRequest, sentences: Sequence[str]) -> Answer:
        """Which sentences address the request's query (by the query's true topic)."""
        _, query_topic = self._query(request)
        useful = {
            s.strip().lower()
            for s in sentences
            if not is_bridge(s) and (t := sentence_topic(s)) is not None and t.name == query_topic
        }
        addressing = sum(1 for s in sentences if s.strip().lower() in useful)
        return Answer(useful=len(useful), talk=len(sentences) - addressing, sentences=len(sentences))

    def standalone_ctr(self, request: AuctionRequest) -> np.ndarray:
        """CTR of each candidate shown alone in position 1 of a plain answer: the first-order part."""
        cats, relevance, interest, quality = self._lookup(request, range(len(request.ads)))
        base = self._base(relevance, interest, quality)
        return self._ctr(base[:, None], cats[:, None], relevance[:, None], np.ones(len(base)))[:, 0]

    def _base(self, relevance: np.ndarray, interest: np.ndarray, quality: np.ndarray) -> np.ndarray:
        c = self.cfg
        logit = (
            c.intercept
            + c.w_relevance * relevance
            + c.w_interest * interest
            + c.w_quality * (2 * quality - 1)
        )
        return 1.0 / (1.0 + np.exp(-logit))

    def _set_multiplier(self, cats: np.ndarray) -> np.ndarray:
        """Externalities and fatigue of showing ads of categories `cats` (..., n) together."""
        c = self.cfg
        n = cats.shape[-1]
        same = (cats[..., :, None] == cats[..., None, :]).sum(axis=-1) - 1
        return (
            (1 - c.same_category_externality) ** same
            * (1 - c.other_ad_externality) ** (n - 1 - same)
            * (1 - c.ad_load_fatigue) ** max(0, n - c.fatigue_free_ads)
        )

    def _ctr(
        self, base: np.ndarray, cats: np.ndarray, native: np.ndarray, answer_factor: np.ndarray
    ) -> np.ndarray:
        """The click model's product for ads in positions 1..n (last axis), any leading shape:
        position decay, externalities and load, nativeness, and the answer's own factor (...).
        """
        n = cats.shape[-1]
        return (
            base
            * self.cfg.position_decay ** np.arange(n)
            * self._set_multiplier(cats)
            * self._native_factor(native)
            * np.asarray(answer_factor)[..., None]
        )

    def _native_factor(self, nativeness: np.ndarray) -> np.ndarray:
        h = self.cfg.hard_ad_factor
        return h + (1 - h) * np.asarray(nativeness, dtype=float)

    def _share(self, n_ads: int | np.ndarray, answer: Answer, extra_talk: int | np.ndarray = 0) -> np.ndarray:
        """Share of the answer's units (ads and sentences) that are ads or ad talk."""
        units = np.maximum(n_ads + answer.sentences + extra_talk, 1)
        return np.asarray((n_ads + answer.talk + extra_talk) / units, dtype=float)

    def _answer_factor(self, answer: Answer, share: np.ndarray) -> np.ndarray:
        """Quality floor and flooding: the same multiplier for every ad of the answer."""
        c = self.cfg
        quality = (1 - c.low_quality_penalty) ** max(0, c.quality_floor - answer.useful)
        crowded = np.clip((1 - share) / (1 - c.flood_threshold), 0.0, 1.0) ** c.flood_power
        return quality * np.where(share <= c.flood_threshold, 1.0, crowded)

    def expected_ctr(
        self, request: AuctionRequest, allocation: Sequence[int], response: str | None = None
    ) -> np.ndarray:
        n = len(allocation)
        if n == 0:
            return np.zeros(0)
        cats, relevance, interest, quality = self._lookup(request, allocation)
        base = self._base(relevance, interest, quality)
        if response is None:
            return self._ctr(base, cats, relevance, np.float64(1.0))
        _, answer, native = self._read_page(request, allocation, response)
        return self._ctr(base, cats, np.array(native), self._answer_factor(answer, self._share(n, answer)))

    def _read_page(
        self, request: AuctionRequest, allocation: Sequence[int], response: str
    ) -> tuple[Layout, Answer, list[float]]:
        """The written page as the user reads it: its layout, its answer, each inserted ad's nativeness."""
        layout = read_layout(response, list(allocation))
        answer = self.read_answer(request, layout.sentences)
        native = [self._nativeness(request.ads[i].ad_id, c) for i, c in zip(allocation, layout.contexts)]
        return layout, answer, native

    def page_terms(
        self, request: AuctionRequest, allocation: Sequence[int], response: str
    ) -> dict[str, float]:
        """The terms of `expected_ctr` that the page's writing sets (the ads' own terms aside): the
        sentences that address the query and the ad talk around them, the inserted ads' mean
        nativeness, and the answer factor (quality floor x crowding) every ad's CTR is multiplied by.
        """
        layout, answer, native = self._read_page(request, allocation, response)
        return {
            "useful": float(answer.useful),
            "talk": float(answer.talk),
            "bridges": float(sum(map(is_bridge, layout.sentences))),
            "below_quality_floor": float(answer.useful < self.cfg.quality_floor),
            "nativeness": float(np.mean(native)) if native else float("nan"),
            "answer_factor": float(self._answer_factor(answer, self._share(len(allocation), answer)))
            if allocation
            else float("nan"),
        }

    def user_utility(self, request: AuctionRequest, response: str, n_ads: int) -> float:
        """The user's utility of the answer itself (welfare's user term): useful and uncrowded."""
        answer = self.read_answer(request, read_layout(response, []).sentences)
        floor = self.cfg.quality_floor
        useful = 1.0 if floor == 0 else min(answer.useful, floor) / floor
        return float(self.cfg.user_weight * useful * (1 - self._share(n_ads, answer)))

    def best_layout(
        self,
        request: AuctionRequest,
        weights: np.ndarray,
        sentences: Sequence[str],
        slots: Sequence[Sequence[int]],
        max_layouts: int = 20000,
    ) -> OracleLayout:
        """The layout maximising sum_i weights_i * ctr_i over ordered ad sets and bridges.

        `sentences` is the organic answer and `slots[n]` the sentence after which each of n ads
        goes (0: before the first); an ad that names a product may be led by its bridge
        (`text.reading.bridge_for`: a native introduction that is ad talk). Exact over every
        ordered set of up to `len(slots) - 1` ads and every choice of bridges, computed with the
        same terms `expected_ctr` reads from the written text; when that is more than
        `max_layouts` layouts, only the candidates with the highest weight x standalone CTR
        take part.
        """
        k = len(request.ads)
        weights = np.asarray(weights, dtype=float)
        answer = self.read_answer(request, sentences)
        cats, relevance, interest, quality = self._lookup(request, range(k))
        base = self._base(relevance, interest, quality)
        ads = [a.ad_id for a in request.ads]
        bridgeable = np.array([product_of(a.text) is not None for a in request.ads])
        max_ads = min(len(slots) - 1, k)

        def n_layouts(m: int) -> int:
            return sum(math.perm(m, n) * 2**n for n in range(1, min(max_ads, m) + 1))

        pool = k
        while pool > 1 and n_layouts(pool) > max_layouts:
            pool -= 1
        candidates = [
            int(i) for i in np.argsort(-weights * base * self._native_factor(relevance), kind="stable")[:pool]
        ]
        best = OracleLayout((), (), 0.0)
        for n in range(1, min(max_ads, pool) + 1):
            orders = np.array(list(itertools.permutations(candidates, n)), dtype=int)
            masks = np.array(list(itertools.product((False, True), repeat=n)), dtype=bool)
            order = np.repeat(orders, len(masks), axis=0)
            bridged = np.tile(masks, (len(orders), 1))
            plain = np.zeros((k, n))
            for p, slot in enumerate(slots[n]):
                stacked = p > 0 and slots[n][p - 1] == slot
                context = None if slot == 0 or stacked else sentences[slot - 1]
                plain[:, p] = [self._nativeness(a, context) for a in ads]
            native = np.where(bridged, 1.0, plain[order, np.arange(n)])
            share = self._share(n, answer, bridged.sum(axis=1))
            ctr = self._ctr(base[order], cats[order], native, self._answer_factor(answer, share))
            totals = np.where(
                (bridged & ~bridgeable[order]).any(axis=1), -np.inf, (weights[order] * ctr).sum(axis=1)
            )
            row = int(np.argmax(totals))
            if totals[row] > best.value:
                best = OracleLayout(
                    tuple(int(i) for i in order[row]),
                    tuple(bool(b) for b in bridged[row]),
                    float(totals[row]),
                )
        return best
