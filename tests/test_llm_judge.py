"""The LLM-judge click model against a real OpenAI-compatible HTTP server on loopback."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from llm_auction.config import LLMJudgeConfig
from llm_auction.contracts import AuctionRequest
from llm_auction.errors import UnknownEntityError
from llm_auction.simulator.llm_judge import JudgeError, LLMJudgeClickModel, parse_judgment

AD_TEXTS = ("Cheap flights to Rome", "Boutique hotels in Paris", "Travel insurance from 5 EUR")
AD_P = {AD_TEXTS[0]: 0.6, AD_TEXTS[1]: 0.3, AD_TEXTS[2]: 0.05}
PROFILE = "Student in Lyon who loves budget travel and Italian food."
QUERY = "How do I plan a cheap weekend in Rome?"
# A shown ad, not the prompt's own description of the format "[Ad: <ad text>]".
_SHOWN_AD = re.compile(r"\[Ad: ([^\]<][^\]]*)\]")


class FakeJudge:
    """What the server received, and canned replies to serve before the deterministic judge."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.canned: list[tuple[int, str | None]] = []  # (status, content) served first, in order
        self.lock = threading.Lock()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.canned.clear()

    @staticmethod
    def judge(body: dict[str, Any]) -> str:
        """p from each shown ad's text (AD_P), in order of appearance in the user message."""
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        texts = _SHOWN_AD.findall(user)
        return json.dumps({"clicks": [{"ad": k, "p": AD_P.get(t, 0.5)} for k, t in enumerate(texts, 1)]})


def _make_handler(fake: FakeJudge) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - keep test output quiet
            pass

        def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length", "0"))
            body = json.loads(self.rfile.read(length) or b"{}")
            with fake.lock:
                fake.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, content = fake.canned.pop(0) if fake.canned else (200, None)
            if self.path != "/v1/chat/completions":
                self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                return
            if status != 200:
                error = {"error": {"message": "judge overloaded", "type": "server_error"}}
                self._send(status, error, {"retry-after-ms": "1"})
                return
            if content is None:
                content = fake.judge(body)
            self._send(
                200,
                {
                    "id": f"chatcmpl-test-{len(fake.requests)}",
                    "object": "chat.completion",
                    "created": 1767225600,
                    "model": body.get("model", ""),
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": content},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
                },
            )

    return Handler


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[FakeJudge, str]]:
    fake = FakeJudge()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(fake))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield fake, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=2)


@pytest.fixture
def judge_server(server: tuple[FakeJudge, str], monkeypatch: pytest.MonkeyPatch) -> tuple[FakeJudge, str]:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    server[0].reset()
    return server


def _cfg(base_url: str, **overrides: Any) -> LLMJudgeConfig:
    values = {
        "base_url": base_url,
        "model": "judge-test-model",
        "api_key_env": "JUDGE_TEST_KEY",
        "timeout_s": 2.0,
        "max_retries": 0,
        "temperature": 0.0,
    }
    return LLMJudgeConfig(**{**values, **overrides})


def _model(base_url: str, environ: dict[str, str] | None = None, **overrides: Any) -> LLMJudgeClickModel:
    return LLMJudgeClickModel(_cfg(base_url, **overrides), {"u1": PROFILE}, environ=environ or {})


def _request(user_id: str = "u1") -> AuctionRequest:
    ads = [
        {"ad_id": f"a{i}", "advertiser_id": f"adv{i}", "text": t, "bid": 1.0 + i}
        for i, t in enumerate(AD_TEXTS)
    ]
    return AuctionRequest.model_validate({"request_id": "r1", "user_id": user_id, "query": QUERY, "ads": ads})


RESPONSE = "Fly midweek to save money. [AD 3] Stay near Termini. [AD 1] Eat where locals eat."


def test_probabilities_follow_the_allocation_order(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    ctr = _model(url).expected_ctr(_request(), [2, 0], RESPONSE)
    np.testing.assert_allclose(ctr, [AD_P[AD_TEXTS[2]], AD_P[AD_TEXTS[0]]])
    assert len(fake.requests) == 1


def test_the_endpoint_sees_model_profile_query_and_rendered_ads(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    _model(url, temperature=0.3).expected_ctr(_request(), [2, 0], RESPONSE)
    (sent,) = fake.requests
    assert sent["path"] == "/v1/chat/completions"
    body = sent["body"]
    assert body["model"] == "judge-test-model"
    assert body["temperature"] == pytest.approx(0.3)
    assert body["response_format"] == {"type": "json_object"}
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    assert PROFILE in user and QUERY in user
    assert f"Fly midweek to save money. [Ad: {AD_TEXTS[2]}] Stay near Termini. [Ad: {AD_TEXTS[0]}]" in user
    assert AD_TEXTS[1] not in user
    assert "[AD " not in user
    assert '"clicks"' in user


def test_the_judge_is_asked_the_click_models_criteria(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    _model(url).expected_ctr(_request(), [2, 0], RESPONSE)
    (sent,) = fake.requests
    user = next(m["content"] for m in sent["body"]["messages"] if m["role"] == "user")
    for criterion in ("Relevance:", "Nativeness:", "Position and competition:", "flooding:"):
        assert criterion in user
    assert "native ad" in user and "hard ad" in user and "dominate the answer" in user


def test_without_response_text_the_inserted_ads_are_listed(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    ctr = _model(url).expected_ctr(_request(), [1, 2, 0])
    np.testing.assert_allclose(ctr, [AD_P[t] for t in (AD_TEXTS[1], AD_TEXTS[2], AD_TEXTS[0])])
    user = fake.requests[0]["body"]["messages"][-1]["content"]
    assert f"[Ad: {AD_TEXTS[1]}]\n[Ad: {AD_TEXTS[2]}]\n[Ad: {AD_TEXTS[0]}]" in user


def test_identical_calls_are_cached(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    model = _model(url)
    first = model.expected_ctr(_request(), [2, 0], RESPONSE)
    first[0] = 99.0  # the caller's copy, not the cache
    second = model.expected_ctr(_request(), [2, 0], RESPONSE)
    assert len(fake.requests) == 1
    np.testing.assert_allclose(second, [AD_P[AD_TEXTS[2]], AD_P[AD_TEXTS[0]]])
    model.expected_ctr(_request(), [0], "Only one ad here. [AD 1]")
    assert len(fake.requests) == 2
    assert model.cache_size == 2


def test_empty_allocation_makes_no_call(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    ctr = _model(url).expected_ctr(_request(), [], "No ads at all.")
    assert ctr.shape == (0,)
    assert fake.requests == []


def test_unknown_user(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    with pytest.raises(UnknownEntityError) as info:
        _model(url).expected_ctr(_request(user_id="ghost"), [0], "Hi. [AD 1]")
    assert str(info.value).startswith("user_id:")
    assert fake.requests == []


def test_allocation_that_disagrees_with_the_response(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    with pytest.raises(ValueError, match="allocation"):
        _model(url).expected_ctr(_request(), [0, 2], RESPONSE)
    assert fake.requests == []


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("I would click the first one.", "not JSON"),
        ('{"clicks": [{"ad": 1, "p": 0.4}]}', "expected 2 click entries"),
        ('{"clicks": [{"ad": 1, "p": 0.4}, {"ad": 2, "p": 0.1}, {"ad": 3, "p": 0.1}]}', "expected 2"),
        ('{"clicks": [{"ad": 1, "p": 0.4}, {"ad": 1, "p": 0.1}]}', "judged twice"),
        ('{"clicks": [{"ad": 1, "p": 0.4}, {"ad": 3, "p": 0.1}]}', "expected a position"),
        ('{"clicks": [{"ad": 1, "p": "high"}, {"ad": 2, "p": 0.1}]}', "probability 'high'"),
        ('{"probabilities": [0.4, 0.1]}', '"clicks" list'),
        ("", "empty reply"),
    ],
)
def test_malformed_replies_raise(judge_server: tuple[FakeJudge, str], content: str, reason: str) -> None:
    fake, url = judge_server
    fake.canned.append((200, content))
    model = _model(url)
    with pytest.raises(JudgeError, match=re.escape(reason)) as info:
        model.expected_ctr(_request(), [2, 0], RESPONSE)
    assert "reply:" in str(info.value)
    assert content[:20] in str(info.value)
    assert model.cache_size == 0


def test_fences_any_entry_order_and_clipping_are_tolerated(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    fake.canned.append((200, '\n```json\n{"clicks": [{"ad": 2, "p": -0.2}, {"ad": 1, "p": 1.7}]}\n```\n'))
    ctr = _model(url).expected_ctr(_request(), [2, 0], RESPONSE)
    np.testing.assert_allclose(ctr, [1.0, 0.0])


def test_parse_rejects_non_finite_probabilities() -> None:
    with pytest.raises(JudgeError, match="probability"):
        parse_judgment('{"clicks": [{"ad": 1, "p": NaN}]}', 1)


def test_server_error_is_retried(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    fake.canned.append((500, None))
    ctr = _model(url, max_retries=1).expected_ctr(_request(), [0], "Rome on a budget. [AD 1]")
    np.testing.assert_allclose(ctr, [AD_P[AD_TEXTS[0]]])
    assert len(fake.requests) == 2


def test_server_error_without_retries_raises(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    fake.canned.append((500, None))
    with pytest.raises(JudgeError, match="failed"):
        _model(url, max_retries=0).expected_ctr(_request(), [0], "Rome on a budget. [AD 1]")
    assert len(fake.requests) == 1


def test_api_key_from_the_environment(judge_server: tuple[FakeJudge, str]) -> None:
    fake, url = judge_server
    _model(url, environ={"JUDGE_TEST_KEY": "sk-test-123"}).expected_ctr(_request(), [0], "Hi. [AD 1]")
    _model(url, environ={}).expected_ctr(_request(), [1], "Hi. [AD 2]")
    first, second = (r["headers"] for r in fake.requests)
    auth = {k.lower(): v for k, v in first.items()}["authorization"]
    assert auth == "Bearer sk-test-123"
    assert {k.lower(): v for k, v in second.items()}["authorization"] == "Bearer not-needed"
