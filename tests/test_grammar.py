from hypothesis import given, settings
from hypothesis import strategies as st

from llm_auction.mechanism.grammar import VALID_MARKER, marker, parse_response, render_response

MARKERISH = st.sampled_from(
    [
        "[AD 1]",
        "[AD 2]",
        "[AD 9]",
        "[ad 1]",
        "[AD x]",
        "[AD 01]",
        "[AD 3",
        "[ AD 2]",
        "[AD]",
        "[AD 0]",
        "[AD 999999]",
        "[Ad 4]",
        "]",
        "[",
        " ",
    ]
)
TEXTISH = st.lists(st.one_of(st.text(max_size=20), MARKERISH), max_size=30).map("".join)


@settings(max_examples=400, deadline=None)
@given(
    text=st.one_of(st.text(max_size=300), TEXTISH),
    k=st.integers(0, 10),
    max_ads=st.none() | st.integers(0, 4),
)
def test_arbitrary_text_never_raises_and_allocation_is_valid(text, k, max_ads):
    parsed = parse_response(text, k, max_ads)
    assert len(set(parsed.allocation)) == len(parsed.allocation)
    assert all(0 <= i < k for i in parsed.allocation)
    if max_ads is not None:
        assert len(parsed.allocation) <= max_ads
    # every insertion, and every valid marker refused as a repeat or over the limit, is a marker in the text
    counted = len(parsed.allocation) + parsed.errors["duplicate"] + parsed.errors["over_limit"]
    assert counted <= len(VALID_MARKER.findall(text))


@settings(max_examples=200, deadline=None)
@given(
    sentences=st.lists(st.text(alphabet="abcdefgh .,", min_size=1, max_size=30), min_size=1, max_size=5),
    data=st.data(),
)
def test_render_then_parse_round_trips(sentences, data):
    k = data.draw(st.integers(1, 8))
    chosen = data.draw(st.lists(st.integers(0, k - 1), unique=True, max_size=k))
    slots = sorted(
        data.draw(st.lists(st.integers(0, len(sentences)), min_size=len(chosen), max_size=len(chosen)))
    )
    text = render_response(sentences, list(zip(slots, chosen)))
    parsed = parse_response(text, k)
    assert parsed.allocation == tuple(chosen)
    assert parsed.well_formed


def test_crafted_counts():
    text = "Intro. [AD 2] more [AD 2] then [ad 3] and [AD 7] and [AD x] [AD 1] [AD 3] [AD 4]"
    parsed = parse_response(text, n_candidates=5, max_ads=3)
    assert parsed.allocation == (1, 0, 2)
    assert parsed.positions == (1, 2, 3)
    assert parsed.errors == {"duplicate": 1, "malformed": 2, "unknown": 1, "over_limit": 1}
    assert parsed.n_errors == 5
    assert parsed.organic_text == "Intro. more then and and"
    # each inserted ad's lead-in: the text since the marker-like text before it, "" when none
    assert parsed.lead_ins == ("Intro.", "", "")


def test_lead_ins_are_the_text_right_before_each_inserted_ad():
    parsed = parse_response("[AD 1] Pack light. Book early. [AD 3] [AD 2] Done.", 3)
    assert parsed.allocation == (0, 2, 1)
    assert parsed.lead_ins == ("", "Pack light. Book early.", "")


def test_plain_text_and_edge_markers():
    assert parse_response("No ads here, just [brackets] and ads.", 3).allocation == ()
    assert parse_response("No ads here, just [brackets] and ads.", 3).well_formed
    assert parse_response("[ADVERTISEMENT] is a word", 3).well_formed
    assert parse_response("[AD 0]", 3).errors == {"unknown": 1}
    assert parse_response("[AD 1]", 0).errors == {"unknown": 1}
    assert parse_response("[AD 1][AD 2]", 2).allocation == (0, 1)
    assert parse_response(None, 2).errors == {"malformed": 1}  # type: ignore[arg-type]
    assert marker(3) == "[AD 3]"
