"""The LLM-as-a-judge click model: an OpenAI-compatible chat model plays the user.

The judge is shown the user's profile, their query and the response exactly as the user would
read it: every inserted marker `[AD k]` is replaced by `[Ad: <ad text>]` (marker-like text that
inserts nothing is dropped, as the parser drops it from the organic text). It answers with one
JSON object holding a click probability per inserted ad, in order of appearance:

    {"clicks": [{"ad": 1, "p": 0.12}, {"ad": 2, "p": 0.03}]}

`ad` is the ad's position (1-based, order of appearance), `p` the probability of a click. The
reply is parsed strictly: code fences and whitespace around the object are tolerated and each
`p` is clipped to [0, 1], but a reply that is not such an object, lacks a position, repeats one,
adds one or gives a non-numeric probability raises `JudgeError`; there is never a silent fallback.

Judgments are cached in memory per (user_id, query, rendered response), so repeated identical
calls do not reach the endpoint again. An empty allocation never calls the endpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import openai

from llm_auction.config import LLMJudgeConfig
from llm_auction.contracts import AuctionRequest
from llm_auction.errors import JudgeError
from llm_auction.mechanism.grammar import MARKER_LIKE, VALID_MARKER
from llm_auction.simulator.base import UnknownEntityError

logger = logging.getLogger(__name__)

PLACEHOLDER_API_KEY = "not-needed"
"""Sent when the API-key variable is unset: local OpenAI-compatible servers accept any key."""

SYSTEM_PROMPT = (
    "You simulate one user of an AI assistant and judge how likely that user is to click each "
    "sponsored ad shown in the assistant's answer. Reply with a single JSON object and nothing else."
)
"""The system message of every judge call."""

JUDGE_PROMPT_TEMPLATE = """\
You are this user:
{profile}

You asked the assistant:
{query}

The assistant's answer, as you see it (each sponsored ad appears as [Ad: <ad text>]):
{response}

The answer shows {n_ads} ad(s), numbered 1 to {n_ads} in order of appearance. For each ad, \
estimate the probability (a number from 0 to 1) that you, this user, would click it. Judge as a \
real user would:
- Relevance: an ad for what you asked about, or for what your profile says you like, draws clicks.
- Nativeness: an ad that the sentence right before it introduces naturally (a native ad) is \
clicked far more than a hard ad dropped in without a connection to the text around it.
- Position and competition: ads further down get less attention, and similar ads shown together \
split it.
- Answer quality and flooding: if the answer does not really address your question, you trust \
its ads less; if ads or talk about ads dominate the answer, you click almost nothing.

Reply with only a JSON object of this form, with exactly {n_ads} entries, one per ad, \
in order of appearance:
{example}"""
"""The user message of a judge call.

The criteria are those of the parametric click model (`simulator.parametric`): relevance,
nativeness, position and competition, answer quality and flooding.

Placeholders: `profile` (the user's profile text), `query` (the request's query), `response`
(the rendered response: markers replaced by `[Ad: <ad text>]`, or only the inserted ads one per
line when no response text is given), `n_ads` (the number of inserted ads) and `example` (the
expected JSON shape, `{"clicks": [{"ad": 1, "p": <probability>}, ...]}` with one entry per ad).
"""

AD_TEMPLATE = "[Ad: {text}]"
"""How an inserted ad is shown to the judge in place of its marker."""

_RUNS_OF_BLANKS = re.compile(r"[ \t]{2,}")
_FENCE = re.compile(r"^```[A-Za-z0-9_-]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)
_EXCERPT_CHARS = 200


def _excerpt(text: str | None, limit: int = _EXCERPT_CHARS) -> str:
    if text is None:
        return "<no content>"
    return repr(text if len(text) <= limit else text[:limit] + "...")


def render_for_judge(request: AuctionRequest, allocation: Sequence[int], response: str | None) -> str:
    """The response as the user sees it: each inserted ad's marker replaced by `[Ad: <ad text>]`.

    With `response=None` the text is only the inserted ads, one per line, in allocation order.
    Otherwise the first marker of each allocated candidate is rendered; every other marker-like
    text (repeats, ads beyond the allocation, malformed markers) is dropped. The ads rendered
    must be exactly `allocation`, in order, or a `ValueError` names the mismatch.
    """
    if response is None:
        return "\n".join(AD_TEMPLATE.format(text=request.ads[i].text) for i in allocation)
    wanted = set(allocation)
    shown: list[int] = []

    def substitute(match: re.Match[str]) -> str:
        valid = VALID_MARKER.fullmatch(match.group(0))
        if valid is not None:
            index = int(valid.group(1)) - 1
            if index in wanted and index not in shown:
                shown.append(index)
                return AD_TEMPLATE.format(text=request.ads[index].text)
        return ""

    rendered = MARKER_LIKE.sub(substitute, response)
    if shown != list(allocation):
        raise ValueError(
            f"allocation: {list(allocation)} does not match the ads inserted in the response, "
            f"in order of appearance: {shown}"
        )
    return _RUNS_OF_BLANKS.sub(" ", rendered).strip()


def build_prompt(profile: str, query: str, rendered_response: str, n_ads: int) -> str:
    """The judge's user message (see `JUDGE_PROMPT_TEMPLATE`)."""
    entries = ", ".join(f'{{"ad": {k}, "p": <probability>}}' for k in range(1, n_ads + 1))
    example = f'{{"clicks": [{entries}]}}'
    return JUDGE_PROMPT_TEMPLATE.format(
        profile=profile, query=query, response=rendered_response, n_ads=n_ads, example=example
    )


def _strip_fences(content: str) -> str:
    text = content.strip()
    fenced = _FENCE.match(text)
    return fenced.group(1).strip() if fenced else text


def _as_position(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def parse_judgment(content: str | None, n_ads: int) -> np.ndarray:
    """Click probabilities, by position, from the judge's reply; raises `JudgeError` if invalid.

    The reply must be `{"clicks": [{"ad": k, "p": q}, ...]}` with exactly one entry per position
    k = 1..n_ads (entries may come in any order); q must be a finite number and is clipped to
    [0, 1]. Whitespace and a Markdown code fence around the object are tolerated.
    """

    def fail(reason: str) -> JudgeError:
        return JudgeError(f"invalid judge reply: {reason}; reply: {_excerpt(content)}")

    if not isinstance(content, str) or not content.strip():
        raise fail("empty reply")
    try:
        payload = json.loads(_strip_fences(content))
    except json.JSONDecodeError as exc:
        raise fail(f"not JSON ({exc.msg} at char {exc.pos})") from None
    if not isinstance(payload, dict) or not isinstance(payload.get("clicks"), list):
        raise fail('expected a JSON object with a "clicks" list')
    entries = payload["clicks"]
    if len(entries) != n_ads:
        raise fail(f"expected {n_ads} click entries, got {len(entries)}")
    probs: dict[int, float] = {}
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or "ad" not in entry or "p" not in entry:
            raise fail(f'entry {number} is not an object with "ad" and "p"')
        position = _as_position(entry["ad"])
        if position is None or not 1 <= position <= n_ads:
            raise fail(f"entry {number} has ad {entry['ad']!r}, expected a position in 1..{n_ads}")
        if position in probs:
            raise fail(f"ad {position} is judged twice")
        p = entry["p"]
        if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p):
            raise fail(f"ad {position} has probability {p!r}, expected a number in [0, 1]")
        probs[position] = min(max(float(p), 0.0), 1.0)
    return np.array([probs[k] for k in range(1, n_ads + 1)], dtype=float)


class LLMJudgeClickModel:
    """Click probabilities judged by an OpenAI-compatible chat model playing the user."""

    def __init__(
        self,
        cfg: LLMJudgeConfig,
        profiles: Mapping[str, str],
        environ: Mapping[str, str] | None = None,
    ) -> None:
        """Connect to the judge endpoint.

        Args:
            cfg: endpoint, model name, timeout, retries and temperature.
            profiles: user_id -> the user's profile text.
            environ: where the API-key variable `cfg.api_key_env` is read (default `os.environ`);
                when unset, a placeholder key is sent.
        """
        self.cfg = cfg
        self._profiles = dict(profiles)
        env = os.environ if environ is None else environ
        api_key = env.get(cfg.api_key_env) or PLACEHOLDER_API_KEY
        self._client = openai.OpenAI(
            base_url=cfg.base_url, api_key=api_key, timeout=cfg.timeout_s, max_retries=cfg.max_retries
        )
        self._cache: dict[tuple[str, str, str], np.ndarray] = {}
        self._lock = threading.Lock()

    @property
    def cache_size(self) -> int:
        """Number of distinct judgments held in memory."""
        return len(self._cache)

    def expected_ctr(
        self, request: AuctionRequest, allocation: Sequence[int], response: str | None = None
    ) -> np.ndarray:
        """Click probability of each inserted ad, in allocation order, as judged by the model.

        Raises:
            UnknownEntityError: the request's user has no profile.
            ValueError: the allocation names no candidate, repeats one or disagrees with the
                markers of `response`.
            JudgeError: the endpoint failed (after its retries) or replied with no valid judgment.
        """
        allocation = [int(i) for i in allocation]
        n = len(allocation)
        if n == 0:
            return np.zeros(0)
        if request.user_id not in self._profiles:
            raise UnknownEntityError(f"user_id: no profile for user {request.user_id!r}")
        for i in allocation:
            if not 0 <= i < len(request.ads):
                raise ValueError(f"allocation: index {i} is not a candidate (0..{len(request.ads) - 1})")
        if len(set(allocation)) != n:
            raise ValueError(f"allocation: {allocation} inserts a candidate twice")
        rendered = render_for_judge(request, allocation, response)
        key = (request.user_id, request.query, rendered)
        with self._lock:
            cached = self._cache.get(key)
        if cached is not None:
            logger.debug("judge cache hit for request %s", request.request_id)
            return cached.copy()
        prompt = build_prompt(self._profiles[request.user_id], request.query, rendered, n)
        content = self._ask(prompt, request.request_id)
        ctr = parse_judgment(content, n)
        with self._lock:
            self._cache[key] = ctr
        logger.debug("judge for request %s: %s", request.request_id, ctr.tolist())
        return ctr.copy()

    def _ask(self, prompt: str, request_id: str) -> str | None:
        logger.debug("asking judge %s at %s for request %s", self.cfg.model, self.cfg.base_url, request_id)
        try:
            completion = self._client.chat.completions.create(
                model=self.cfg.model,
                messages=[
                    {"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": prompt},
                ],
                temperature=self.cfg.temperature,
                response_format={"type": "json_object"},
            )
        except openai.OpenAIError as exc:
            raise JudgeError(
                f"judge endpoint {self.cfg.base_url} (model {self.cfg.model!r}) failed for request "
                f"{request_id}: {type(exc).__name__}: {exc}"
            ) from exc
        if not completion.choices:
            raise JudgeError(
                f"judge endpoint {self.cfg.base_url} returned no choices for request {request_id}"
            )
        return completion.choices[0].message.content
