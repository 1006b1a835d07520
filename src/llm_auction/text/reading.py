"""Reading the world's language: what a text is about, and how an answer lays out its ads.

Public judgements from words alone (any reader of the sentence bank could make them), used by the
writers (pi_0's imitation data, the baselines) and by the simulated users, who combine them with
the hidden truth. A sentence is about a topic when it names one of the topic's products, states one
of its tips or names the topic itself; a bridge is a lead-in sentence in the form of
`bank.BRIDGE_TEMPLATES`, written to introduce the ad after it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from llm_auction.mechanism.grammar import MARKER_LIKE, VALID_MARKER, split_sentences
from llm_auction.text import bank

_BRIDGES = tuple(
    re.compile(re.escape(t).replace(re.escape("{product}"), r"(?P<product>[a-z ]+)"), re.IGNORECASE)
    for t in bank.BRIDGE_TEMPLATES
)
_CATEGORY_OF = {t.name: c for c in bank.CATEGORIES for t in c.topics}


def category_of(topic: bank.Topic) -> bank.Category:
    return _CATEGORY_OF[topic.name]


def _words(text: str) -> set[str]:
    """The words of a lower-cased text: a topic's name counts only as a whole one."""
    return set(re.findall(r"[a-z]+", text))


@functools.cache
def topic_of(query: str) -> bank.Topic | None:
    """The catalog topic a query is about, read from its words (public text only): a topic's name
    as a word of the query (not inside one: "headphones" is not about phones) or one of its products.
    """
    text = query.lower()
    words = _words(text)
    for category in bank.CATEGORIES:
        for topic in category.topics:
            if topic.name in words or any(product in text for product in topic.products):
                return topic
    return None


@functools.cache
def product_of(ad_text: str) -> tuple[str, bank.Topic] | None:
    """The product an ad names and its topic, or None for text that names no product of the bank."""
    text = ad_text.lower()
    for category in bank.CATEGORIES:
        for topic in category.topics:
            for product in topic.products:
                if product in text:
                    return product, topic
    return None


@functools.cache
def text_relevance(query_topic: bank.Topic | None, ad_text: str) -> float:
    """How well an ad's words match the query's topic: 1 same topic, 0.5 same category, else 0.

    A reader's judgement from public text, not the simulator's hidden ground truth.
    """
    found = product_of(ad_text)
    if query_topic is None or found is None:
        return 0.0
    topic = found[1]
    if topic is query_topic:
        return 1.0
    return 0.5 if category_of(topic) is category_of(query_topic) else 0.0


@functools.cache
def sentence_topic(sentence: str) -> bank.Topic | None:
    """The topic a sentence is about: a product it names, else a tip it states, else the topic's name."""
    text = sentence.lower()
    if (found := product_of(text)) is not None:
        return found[1]
    topics = [t for c in bank.CATEGORIES for t in c.topics]
    for topic in topics:
        if any(tip in text for tip in topic.tips):
            return topic
    words = _words(text)
    return next((t for t in topics if t.name in words), None)


def is_bridge(sentence: str) -> bool:
    """Whether a sentence is a lead-in to an ad (`bank.BRIDGE_TEMPLATES`) rather than part of the answer."""
    return any(b.fullmatch(sentence.strip()) for b in _BRIDGES)


def bridge_for(ad_text: str, template: int = 0) -> str | None:
    """A bridge naming the ad's product (template number `template`), or None if it names none."""
    found = product_of(ad_text)
    if found is None:
        return None
    return bank.BRIDGE_TEMPLATES[template % len(bank.BRIDGE_TEMPLATES)].format(product=found[0])


@dataclass(frozen=True)
class Layout:
    """How a response places its inserted ads among its sentences."""

    sentences: tuple[str, ...]
    """The organic sentences (markers removed), in reading order; bridges included."""
    contexts: tuple[str | None, ...]
    """For each inserted ad, in allocation order: the sentence right before its marker, or None
    when the marker opens the response or follows another marker (a stacked ad has no context)."""


def read_layout(response: str, allocation: Sequence[int]) -> Layout:
    """The layout of `response`, whose inserted ads (as `grammar.parse_response` reads them) are
    `allocation`: the k-th inserted ad is the first valid marker of `allocation[k]` after the
    (k-1)-th, so repeats, unknown and over-limit markers insert nothing (they still break context).
    """
    sentences: list[str] = []
    contexts: list[str | None] = []
    cursor = 0
    for match in MARKER_LIKE.finditer(response):
        before = split_sentences(response[cursor : match.start()])
        sentences.extend(before)
        cursor = match.end()
        valid = VALID_MARKER.fullmatch(match.group(0))
        if (
            valid is not None
            and len(contexts) < len(allocation)
            and int(valid.group(1)) - 1 == allocation[len(contexts)]
        ):
            contexts.append(before[-1] if before else None)
    sentences.extend(split_sentences(response[cursor:]))
    if len(contexts) != len(allocation):
        raise ValueError(f"allocation: {list(allocation)} is not what the response inserts")
    return Layout(tuple(sentences), tuple(contexts))
