"""Template-written organic answers: the text the baselines insert ads into (the LLM writes it later)."""

from __future__ import annotations

import numpy as np

from llm_auction.text import bank
from llm_auction.text.reading import topic_of

_GENERIC_TIPS = ("compare a few options", "read honest reviews", "start small and adjust")


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
