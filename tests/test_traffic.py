"""The simulated users' retry policy, against an in-process transport (no server needed)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from llm_auction.simulator.traffic import INTERNAL_RETRIES, _post


def _post_with(replies: list, budget_s: float = 30) -> tuple[httpx.Response, int]:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        reply = replies[min(calls, len(replies) - 1)]
        calls += 1
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            return await _post(client, "http://127.0.0.1:1/v1/x", {}, {}, budget_s)

    return asyncio.run(run()), calls


def test_shed_load_and_a_restarting_server_are_retried_until_served():
    shed = httpx.Response(503, headers={"retry-after": "0"}, json={"error": "overloaded"})
    down = httpx.ConnectError("connection refused")
    reply, calls = _post_with([shed, down, shed, httpx.Response(200, json={})])
    assert (reply.status_code, calls) == (200, 4)


def test_an_internal_error_is_not_retried_for_the_whole_budget():
    reply, calls = _post_with([httpx.Response(500, json={"error": "bug"})])
    assert (reply.status_code, calls) == (500, INTERNAL_RETRIES + 1)


def test_a_4xx_is_the_answer_at_once():
    reply, calls = _post_with([httpx.Response(400, json={"error": "instances.0.bid"})])
    assert (reply.status_code, calls) == (400, 1)


def test_past_the_budget_the_last_transport_error_is_raised():
    with pytest.raises(httpx.ConnectError, match="refused"):
        _post_with([httpx.ConnectError("connection refused")], budget_s=0.5)
