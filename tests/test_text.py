"""Reading the world's language: topics of sentences, bridges, and where an answer puts its ads."""

import pytest

from llm_auction.mechanism.grammar import parse_response, render_response
from llm_auction.text import bank
from llm_auction.text.reading import (
    bridge_for,
    is_bridge,
    read_layout,
    sentence_topic,
    text_relevance,
    topic_of,
)


def test_a_sentence_is_about_the_topic_whose_product_tip_or_name_it_states():
    assert sentence_topic("Many people pack a light bag.").name == "flights"
    assert sentence_topic("Good question about coffee.").name == "coffee"
    assert sentence_topic("novaline running shoes: simple choice").name == "running"
    assert sentence_topic("Here is what helps with this.") is None


def test_every_bridge_template_reads_as_a_bridge_about_the_ads_topic():
    ad = "get trusted espresso machines from truenest now"
    for t in range(len(bank.BRIDGE_TEMPLATES)):
        bridge = bridge_for(ad, t)
        assert is_bridge(bridge)
        assert sentence_topic(bridge).name == "coffee"
    assert not is_bridge("Remember to use fresh water.")
    assert bridge_for("an ad that names no product") is None


def test_a_query_is_about_a_topic_it_names_as_a_word_not_inside_one():
    assert topic_of("which wireless headphones are worth the money").name == "audio"  # not phones
    assert topic_of("best phones this year").name == "phones"
    assert topic_of("where can i buy good savings accounts").name == "saving"
    assert topic_of("what should i do today") is None


def test_text_relevance_by_topic_and_category():
    coffee = topic_of("best coffee grinders this year")
    assert text_relevance(coffee, "save on coffee beans at peakhub") == 1.0
    assert text_relevance(coffee, "peakhub chef knives: trusted choice") == 0.5
    assert text_relevance(coffee, "peakhub index funds: trusted choice") == 0.0


def test_layout_gives_each_inserted_ad_the_sentence_right_before_it():
    text = render_response(
        ["One.", "Two.", "Three."], [(1, 1), (1, 0), (3, 2)], {2: "For phone cases, here is a good option."}
    )
    allocation = parse_response(text, 3).allocation
    layout = read_layout(text, allocation)
    assert layout.contexts == ("One.", None, "For phone cases, here is a good option.")
    assert layout.sentences == ("One.", "Two.", "Three.", "For phone cases, here is a good option.")


def test_layout_skips_markers_that_insert_nothing_but_they_break_context():
    text = "Intro. [AD 2] [ad 1] Middle. [AD 2] [AD 9] [AD 1]"
    allocation = parse_response(text, 3).allocation
    assert allocation == (1, 0)
    assert read_layout(text, allocation).contexts == ("Intro.", None)
    with pytest.raises(ValueError, match="allocation"):
        read_layout(text, (0, 1))
