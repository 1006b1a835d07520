"""Template-written organic answers: the text the baselines insert ads into (the LLM writes it later)."""

from __future__ import annotations

import numpy as np

from llm_auction.world import catalog

_GENERIC_TIPS = ("compare a few options", "read honest reviews", "start small and adjust")


def topic_of(query: str) -> catalog.Topic | None:
    """The catalog topic a query is about, read from its words (public text only)."""
    text = query.lower()
    for category in catalog.CATEGORIES:
        for topic in category.topics:
            if topic.name in text or any(product in text for product in topic.products):
                return topic
    return None


def organic_answer(query: str, n_sentences: int, rng: np.random.Generator) -> list[str]:
    """An answer of `n_sentences` sentences: an opener, then tips on the query's topic."""
    topic = topic_of(query)
    name = topic.name if topic else "this"
    tips = list(topic.tips if topic else _GENERIC_TIPS)
    opener = catalog.ANSWER_OPENERS[rng.integers(len(catalog.ANSWER_OPENERS))].format(topic=name)
    sentences = [opener]
    for i in rng.permutation(len(tips))[: n_sentences - 1]:
        template = catalog.TIP_TEMPLATES[rng.integers(len(catalog.TIP_TEMPLATES))]
        sentences.append(template.format(tip=tips[i]))
    return sentences
