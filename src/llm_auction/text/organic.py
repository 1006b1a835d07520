"""Template-written organic answers: the text the baselines insert ads into (the LLM writes it later)."""

from __future__ import annotations

import functools

import numpy as np

from llm_auction.text import bank

_GENERIC_TIPS = ("compare a few options", "read honest reviews", "start small and adjust")


@functools.cache
def topic_of(query: str) -> bank.Topic | None:
    """The catalog topic a query is about, read from its words (public text only)."""
    text = query.lower()
    for category in bank.CATEGORIES:
        for topic in category.topics:
            if topic.name in text or any(product in text for product in topic.products):
                return topic
    return None


@functools.cache
def text_relevance(query_topic: bank.Topic | None, ad_text: str) -> float:
    """How well an ad's words match the query's topic: 1 same topic, 0.5 same category, else 0.

    A reader's judgement from public text, not the simulator's hidden ground truth.
    """
    if query_topic is None:
        return 0.0
    text = ad_text.lower()
    if any(product in text for product in query_topic.products):
        return 1.0
    category = next(c for c in bank.CATEGORIES if query_topic in c.topics)
    siblings = (p for t in category.topics if t is not query_topic for p in t.products)
    return 0.5 if any(product in text for product in siblings) else 0.0


@functools.cache
def profile_match(profile: str, ad_text: str) -> float:
    """How strongly a profile text names an interest in the ad's category: 1 first, 0.5 later, else 0."""
    topic = next(
        (t for c in bank.CATEGORIES for t in c.topics if any(p in ad_text.lower() for p in t.products)),
        None,
    )
    if topic is None:
        return 0.0
    category = next(c for c in bank.CATEGORIES if topic in c.topics)
    found = profile.lower().find(category.interest)
    if found < 0:
        return 0.0
    first = min((i for c in bank.CATEGORIES if (i := profile.lower().find(c.interest)) >= 0), default=found)
    return 1.0 if found == first else 0.5


def organic_answer(query: str, n_sentences: int, rng: np.random.Generator) -> list[str]:
    """An answer of `n_sentences` sentences: an opener, then tips on the query's topic."""
    topic = topic_of(query)
    name = topic.name if topic else "this"
    tips = list(topic.tips if topic else _GENERIC_TIPS)
    opener = bank.ANSWER_OPENERS[rng.integers(len(bank.ANSWER_OPENERS))].format(topic=name)
    sentences = [opener]
    for i in rng.permutation(len(tips))[: n_sentences - 1]:
        template = bank.TIP_TEMPLATES[rng.integers(len(bank.TIP_TEMPLATES))]
        sentences.append(template.format(tip=tips[i]))
    return sentences
