"""The response grammar: how a response inserts ads, and the strict parser that reads it back.

A response is organic text in which an ad is inserted by the marker `[AD k]`, where `k` is the
1-based index of a candidate ad in the prompt (no leading zeros, upper-case `AD`, one space).
The serving layer replaces each marker by the ad's creative; the marker itself is what the model
writes, so the allocation is exactly what can be read back from the text:

    "Pack light and book early. [AD 2] Compare fares midweek. [AD 1]"
        -> allocation (candidate 2 at position 1, candidate 1 at position 2)

A position is the 1-based rank of an ad among the valid markers, in order of appearance.
Everything that looks like a marker but is not a valid, new, in-range one is a format error:

- `malformed`: marker-like text that breaks the grammar (`[ad 2]`, `[AD x]`, `[AD 02]`, `[AD 2`);
- `unknown`: a well-formed marker whose index is not a candidate (0 or > K);
- `duplicate`: a candidate inserted a second time (the first insertion counts);
- `over_limit`: a valid marker beyond `max_ads` (the first `max_ads` count).

The parser never raises on any text: errors are counted, the allocation keeps what is valid.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import combinations

ERROR_KINDS = ("malformed", "unknown", "duplicate", "over_limit")

VALID_MARKER = re.compile(r"\[AD ([0-9]|[1-9][0-9]{1,5})\]")
# Anything a reader would take for an attempted marker: a bracket, optional spaces, then "ad".
MARKER_LIKE = re.compile(r"\[\s*ad(?![a-z])[^\[\]\n]{0,12}\]?", re.IGNORECASE)
_SPACES = re.compile(r"\s+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def marker(index: int) -> str:
    """The marker that inserts candidate `index` (1-based)."""
    if index < 1:
        raise ValueError(f"ad index must be >= 1, got {index}")
    return f"[AD {index}]"


@dataclass(frozen=True)
class ParsedResponse:
    """The allocation read from one response, with its format errors."""

    allocation: tuple[int, ...]
    """0-based candidate indices in order of appearance; position = place in this tuple + 1."""
    errors: Counter[str] = field(default_factory=Counter)
    organic_text: str = ""
    lead_ins: tuple[str, ...] = ()
    """Per inserted ad, the text between the marker-like text before it (or the start) and its
    marker, stripped: what a reader sees right before the ad; "" when the ad opens the answer or
    follows another marker."""

    @property
    def n_errors(self) -> int:
        return sum(self.errors.values())

    @property
    def well_formed(self) -> bool:
        return self.n_errors == 0

    @property
    def positions(self) -> tuple[int, ...]:
        return tuple(range(1, len(self.allocation) + 1))


def parse_response(text: str, n_candidates: int, max_ads: int | None = None) -> ParsedResponse:
    """Read the allocation from `text` for a prompt with `n_candidates` ads."""
    if not isinstance(text, str):
        return ParsedResponse((), Counter(malformed=1))
    errors: Counter[str] = Counter()
    allocation: list[int] = []
    lead_ins: list[str] = []
    organic_parts: list[str] = []
    cursor = 0
    for match in MARKER_LIKE.finditer(text):
        organic_parts.append(text[cursor : match.start()])
        cursor = match.end()
        valid = VALID_MARKER.fullmatch(match.group(0))
        if valid is None:
            errors["malformed"] += 1
            continue
        index = int(valid.group(1)) - 1
        if not 0 <= index < n_candidates:
            errors["unknown"] += 1
        elif index in allocation:
            errors["duplicate"] += 1
        elif max_ads is not None and len(allocation) >= max_ads:
            errors["over_limit"] += 1
        else:
            allocation.append(index)
            lead_ins.append(organic_parts[-1].strip())
    organic_parts.append(text[cursor:])
    organic = _SPACES.sub(" ", "".join(organic_parts)).strip()
    return ParsedResponse(tuple(allocation), errors, organic, tuple(lead_ins))


def split_sentences(text: str) -> list[str]:
    """A text's sentences: split after ".", "!" or "?" and the space that follows (one rule for the
    readers of responses, the oracle's and psi's alike).
    """
    stripped = text.strip()
    return [s for s in _SENTENCE_END.split(stripped) if s] if stripped else []


def render_response(
    sentences: Sequence[str], placements: Sequence[tuple[int, int]], leads: Mapping[int, str] | None = None
) -> str:
    """Write organic sentences with ads inserted: `(after_sentence, index)` puts `[AD index+1]`
    after sentence number `after_sentence` (0 = before the first sentence), in the given order;
    `leads[index]`, when given, is a sentence written right before that ad's marker (a bridge).
    """
    leads = leads or {}
    by_slot: dict[int, list[int]] = {}
    for after, index in placements:
        if not 0 <= after <= len(sentences):
            raise ValueError(f"slot {after} outside 0..{len(sentences)}")
        by_slot.setdefault(after, []).append(index)

    def ads_at(slot: int) -> list[str]:
        out = []
        for i in by_slot.get(slot, []):
            if i in leads:
                out.append(leads[i])
            out.append(marker(i + 1))
        return out

    words: list[str] = ads_at(0)
    for number, sentence in enumerate(sentences, start=1):
        words.append(sentence)
        words.extend(ads_at(number))
    return " ".join(words)


def listed_markers(prompt: str) -> tuple[int, ...]:
    """The 1-based indices of the markers a prompt lists (its candidate ads), sorted."""
    return tuple(sorted({int(k) for k in VALID_MARKER.findall(prompt)}))


@lru_cache(maxsize=256)
def page_grammar(listed: tuple[int, ...], max_ads: int) -> str:
    """The well-formed pages of a prompt listing `listed` as an EBNF grammar (vLLM's structured outputs).

    Free text holds no `[`, so the only brackets on a page are markers; each listed marker at most
    once and at most `max_ads` in all. A rule per set of markers already written: order does not
    matter for what may follow, so there are sum_{j <= max_ads} C(K, j) rules (697 for K = 16, 3).
    Sampling under it is the policy renormalised over well-formed pages, the same distribution as
    `policy.generation.WellFormedPages` on the transformers backend.
    """
    rules = ["root ::= " + _state_rule(()), "text ::= [^\\[]*"]
    for size in range(min(max_ads, len(listed)) + 1):
        for written in combinations(listed, size):
            rules.append(f"{_state_rule(written)} ::= text" + _continuations(listed, written, max_ads))
    return "\n".join(rules)


def _state_rule(written: tuple[int, ...]) -> str:
    return "page" + "".join(f"_{k}" for k in written)


def _continuations(listed: tuple[int, ...], written: tuple[int, ...], max_ads: int) -> str:
    if len(written) >= max_ads:
        return ""
    options = [
        f'"{marker(k)}" {_state_rule(tuple(sorted((*written, k))))}' for k in listed if k not in written
    ]
    return f" ({' | '.join(options)})?" if options else ""
