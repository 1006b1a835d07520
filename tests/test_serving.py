"""The policy server and the collector as real processes on 127.0.0.1, driven by real clients.

KServe's own `InferenceRESTClient`, the `openai` client, and raw HTTP for the bad-input suite.
The server reads user profiles from Feast's online store, logs every inference to the collector,
and follows the registry's champion alias.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from helpers import eager_users, pi0_world_config, register_champion
from llm_auction.config import Settings, load_config
from llm_auction.contracts import AuctionRequest
from llm_auction.policy.generation import engine_lora_rank
from llm_auction.policy.prompt import build_prompt
from llm_auction.serving.collector import EventStore
from llm_auction.simulator.experiment import Environment, export_public, user_profiles
from llm_auction.simulator.loop import server_work, sign_up
from llm_auction.simulator.services import free_port, service, wait_until
from llm_auction.simulator.traffic import send_traffic
from llm_auction.tracking import registry

pytestmark = pytest.mark.slow

TOKEN, COLLECTOR_TOKEN = "serving-secret", "collector-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}


@dataclass(frozen=True)
class Stack:
    settings: Settings
    endpoint: str
    collector: str
    root: Path
    requests: list[AuctionRequest]
    env: Environment

    @property
    def predict_url(self) -> str:
        return f"{self.endpoint}/v1/models/policy:predict"


@pytest.fixture(scope="module")
def stack(pi0, policy_env: Environment, tmp_path_factory):
    """pi_0 as the registry's champion, users signed up in Feast, collector and server running."""
    root = tmp_path_factory.mktemp("serving")
    config = pi0_world_config(
        root,
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts")},
        serving={"reload_interval_s": 0.5, "challenger_adapter": True},  # its test below
    )
    settings = load_config(config, environ={})
    register_champion(settings, pi0[0])
    export_public(policy_env, settings.public_dir)
    sign_up(settings, root / "feedback")
    collector_port, server_port = free_port(), free_port()
    collector, endpoint = f"http://127.0.0.1:{collector_port}", f"http://127.0.0.1:{server_port}"
    tokens = {"LLM_AUCTION_SERVING_TOKEN": TOKEN, "LLM_AUCTION_COLLECTOR_TOKEN": COLLECTOR_TOKEN}
    collector_args = ["collector", "--store", str(root / "collector"), "--port", str(collector_port)]
    server_args = ["serve", "--config", str(config), "--port", str(server_port)]
    server_args += ["--logger-url", f"{collector}/v1/events"]
    with (
        service("collector", collector_args, f"{collector}/healthz", root / "logs", env=tokens),
        service("server", server_args, f"{endpoint}/v2/health/ready", root / "logs", env=tokens),
    ):
        requests = policy_env.world.auction_requests(limit=40, offset=2300)
        yield Stack(settings, endpoint, collector, root, requests, policy_env)


def _instance(request: AuctionRequest, **changes) -> dict:
    return {**request.model_dump(mode="json"), **changes}


def test_kserve_rest_client_gets_a_priced_allocation(stack: Stack):
    from kserve import InferenceRESTClient, RESTConfig

    async def call() -> tuple[dict, bool]:
        client = InferenceRESTClient(RESTConfig(protocol="v1", timeout=60))
        try:
            body = {"instances": [_instance(r) for r in stack.requests[:3]]}
            result = await client.infer(stack.endpoint, body, model_name="policy", headers=AUTH)
        finally:
            await client.close()
        v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
        try:
            ready = await v2.is_server_ready(stack.endpoint)
        finally:
            await v2.close()
        return result, ready

    result, ready = asyncio.run(call())
    assert ready is True
    predictions = result["predictions"]
    assert [p["request_id"] for p in predictions] == [r.request_id for r in stack.requests[:3]]
    for request, p in zip(stack.requests[:3], predictions):
        assert p["policy_version"] == "1" and p["response"]
        candidates = {ad.ad_id: ad for ad in request.ads}
        assert [a["position"] for a in p["allocation"]] == list(range(1, len(p["allocation"]) + 1))
        for ad in p["allocation"]:
            assert ad["bid"] == candidates[ad["ad_id"]].bid
            assert ad["advertiser_id"] == candidates[ad["ad_id"]].advertiser_id
            assert ad["expected_payment"] is None  # no pCTR registered yet: no price is invented
    # the inference logger delivered request and response under one ce-id
    store = EventStore(stack.root / "collector")
    try:
        ids = {p["response_id"] for p in predictions}

        def logged() -> bool:
            return ids <= {
                q["response_id"]
                for _, _, response in store.inference_pairs()
                for q in response["predictions"]
            }

        wait_until(logged, "the inference events at the collector", timeout_s=30)
    finally:
        store.close()


def test_openai_client_completes_raw_prompts(stack: Stack):
    import openai

    client = openai.OpenAI(base_url=f"{stack.endpoint}/openai/v1", api_key=TOKEN, max_retries=0)
    request = stack.requests[0]
    prompt = build_prompt(request, user_profiles(stack.env.world)[request.user_id])
    first = client.completions.create(model="policy", prompt=prompt, max_tokens=24, seed=5)
    again = client.completions.create(model="policy", prompt=prompt, max_tokens=24, seed=5)
    assert first.choices[0].text == again.choices[0].text  # seeded sampling repeats
    assert first.usage.prompt_tokens > 0 and first.choices[0].finish_reason in ("stop", "length")
    many = client.completions.create(model="policy", prompt=[prompt, prompt], max_tokens=8, n=2, seed=1)
    assert len(many.choices) == 4
    chat = client.chat.completions.create(
        model="policy", messages=[{"role": "user", "content": prompt}], max_tokens=24, temperature=0
    )
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    with pytest.raises(openai.NotFoundError, match="unknown model"):
        client.completions.create(model="gpt-4", prompt=prompt, max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="policy", prompt=prompt, temperature=7)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"{stack.endpoint}/openai/v1", api_key="wrong", max_retries=0
        ).completions.create(model="policy", prompt=prompt, max_tokens=4)


def _bad_bodies(r: AuctionRequest) -> dict[str, tuple[bytes | dict, str]]:
    ok = _instance(r)
    ads = ok["ads"]
    many = [{**ads[0], "ad_id": f"x{i}"} for i in range(17)]
    return {
        "malformed JSON": (b'{"instances": [', "Unrecognized request format"),
        "not an object": (b"[1, 2]", "body"),
        "no instances": ({}, "instances: field required"),
        "empty instances": ({"instances": []}, "instances"),
        "unknown key": ({"instances": [ok], "extra": 1}, "extra: unknown key"),
        "missing field": ({"instances": [{k: v for k, v in ok.items() if k != "user_id"}]}, "user_id"),
        "negative bid": ({"instances": [{**ok, "ads": [{**ads[0], "bid": -1.0}, *ads[1:]]}]}, "bid"),
        "zero bid": ({"instances": [{**ok, "ads": [{**ads[0], "bid": 0}, *ads[1:]]}]}, "bid"),
        "NaN bid (literal)": (b'{"instances": [{"bid": NaN}]}', "Unrecognized request format"),
        "NaN bid (string)": ({"instances": [{**ok, "ads": [{**ads[0], "bid": "NaN"}, *ads[1:]]}]}, "bid"),
        "huge bid": (
            {"instances": [{**ok, "ads": [{**ads[0], "bid": 1e300}, *ads[1:]]}]},
            "exceeds the maximum bid",
        ),
        "infinite bid": ({"instances": [{**ok, "ads": [{**ads[0], "bid": "inf"}, *ads[1:]]}]}, "bid"),
        "K = 0": ({"instances": [{**ok, "ads": []}]}, "ads"),
        "K too large": ({"instances": [{**ok, "ads": many}]}, "17 candidates exceed the maximum 16"),
        "duplicate ads": ({"instances": [{**ok, "ads": [ads[0], ads[0]]}]}, "duplicate ad_id"),
        "prompt too long": (
            {
                "instances": [
                    {
                        **ok,
                        "ads": [
                            {**ad, "ad_id": f"l{i}", "text": "word " * 190} for i, ad in enumerate(many[:16])
                        ],
                    }
                ]
            },
            "tokens; the policy takes at most",
        ),
        "unknown user": ({"instances": [{**ok, "user_id": "nobody"}]}, "unknown user 'nobody'"),
        "too many instances": ({"instances": [ok] * 65}, "65 requests exceed the maximum 64"),
        "negative max_ads": ({"instances": [{**ok, "max_ads": -1}]}, "max_ads"),
        "bid as text": ({"instances": [{**ok, "ads": [{**ads[0], "bid": "a lot"}, *ads[1:]]}]}, "bid"),
    }


def test_bad_input_gets_a_4xx_naming_the_field_and_the_server_stays_healthy(stack: Stack):
    results = {}
    with httpx.Client(timeout=60) as client:
        for case, (body, expected) in _bad_bodies(stack.requests[0]).items():
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            reply = client.post(
                stack.predict_url, content=content, headers={**AUTH, "content-type": "application/json"}
            )
            results[case] = (reply.status_code, reply.json().get("error", ""), expected)
        oversize = b'{"instances": ["' + b"x" * 1_100_000 + b'"]}'
        reply = client.post(stack.predict_url, content=oversize, headers=AUTH)
        results["oversize body"] = (reply.status_code, reply.json()["error"], "exceeds the limit")
        for case, headers in (("no token", {}), ("wrong token", {"authorization": "Bearer nope"})):
            reply = client.post(
                stack.predict_url, json={"instances": [_instance(stack.requests[0])]}, headers=headers
            )
            results[case] = (reply.status_code, reply.json()["error"], "bearer token")
        reply = client.post(f"{stack.endpoint}/v1/models/nope:predict", json={"instances": []}, headers=AUTH)
        results["unknown model"] = (reply.status_code, reply.json().get("error", ""), "nope")

        failures = {
            case: (status, error)
            for case, (status, error, expected) in results.items()
            if not (400 <= status < 500 and expected.lower() in error.lower())
        }
        assert not failures, failures
        assert client.get(f"{stack.endpoint}/v2/health/ready").json()["ready"] is True
        good = client.post(
            stack.predict_url, json={"instances": [_instance(stack.requests[1])]}, headers=AUTH
        )
        assert (
            good.status_code == 200
            and good.json()["predictions"][0]["request_id"] == stack.requests[1].request_id
        )
        metrics = client.get(f"{stack.endpoint}/metrics").text
        assert "llm_auction_inference_events" in metrics


def test_bad_input_at_the_collector_gets_a_4xx(stack: Stack):
    headers = {"authorization": f"Bearer {COLLECTOR_TOKEN}"}
    click = {
        "event_id": "c1",
        "request_id": "r1",
        "response_id": "x",
        "ad_id": "a",
        "event_timestamp": "2026-11-25T10:00:00+00:00",
    }
    with httpx.Client(base_url=stack.collector, timeout=30) as client:
        cases = {
            "malformed JSON": client.post("/v1/clicks", content=b"{", headers=headers),
            "missing field": client.post(
                "/v1/clicks", json={k: v for k, v in click.items() if k != "ad_id"}, headers=headers
            ),
            "naive timestamp": client.post(
                "/v1/clicks", json={**click, "event_timestamp": "2026-11-25T10:00"}, headers=headers
            ),
            "wrong token": client.post("/v1/clicks", json=click, headers={"authorization": "Bearer no"}),
            "no ce headers": client.post("/v1/events", json={}, headers=headers),
            "oversize": client.post("/v1/clicks", content=b"x" * 1_100_000, headers=headers),
        }
        assert {k: r.status_code for k, r in cases.items() if not 400 <= r.status_code < 500} == {}
        assert "ad_id" in cases["missing field"].json()["error"]
        assert client.get("/healthz").status_code == 200


def test_traffic_clicks_reach_the_collector(stack: Stack):
    store = EventStore(stack.root / "collector")
    try:
        clicks_before = set(store.click_ids())
    finally:
        store.close()
    work_before = server_work(stack.endpoint)
    requests = stack.env.world.auction_requests(limit=100, offset=2400)
    report = asyncio.run(
        send_traffic(
            stack.endpoint,
            requests,
            eager_users(stack.env),
            collector=stack.collector,
            concurrency=8,
            seed=3,
            token=TOKEN,
            collector_token=COLLECTOR_TOKEN,
            progress=False,
        )
    )
    assert report.served == 100 and report.failed == 0 and report.rejected == 0
    assert report.clicks > 0 and report.clicks_acknowledged == report.clicks
    store = EventStore(stack.root / "collector")
    try:
        stored = set(store.click_ids())
    finally:
        store.close()
    assert len(stored - clicks_before) == report.clicks  # each acknowledged click is stored, once
    assert report.latency_p50_ms <= report.latency_p99_ms
    work = server_work(stack.endpoint)  # where the server's time went, as the loop records it
    assert work["responses"] - work_before.get("responses", 0) == 100
    assert work["generate_s"] > work_before.get("generate_s", 0) and work["profiles_s"] > 0
    assert work["characters"] - work_before.get("characters", 0) >= 100


def test_the_traffic_command_prints_its_summary_and_writes_json(stack: Stack, tmp_path):
    import os
    import subprocess
    import sys

    args = [sys.executable, "-m", "llm_auction", "traffic", "--endpoint", stack.endpoint]
    args += ["--collector", stack.collector, "--requests", "6", "--offset", "2300", "--concurrency", "3"]
    args += ["--config", str(stack.root / "config.yaml"), "--json", str(tmp_path / "traffic.json")]
    env = {**os.environ, "LLM_AUCTION_SERVING_TOKEN": TOKEN, "LLM_AUCTION_COLLECTOR_TOKEN": COLLECTOR_TOKEN}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "sent / served / rejected / failed" in done.stdout and "6 / 6 / 0 / 0" in done.stdout
    summary = json.loads((tmp_path / "traffic.json").read_text())
    assert summary["served"] == 6 and summary["clicks_acknowledged"] == summary["clicks"]
    wrong = subprocess.run(
        args, env={**env, "LLM_AUCTION_SERVING_TOKEN": "nope"}, capture_output=True, text=True
    )
    assert wrong.returncode != 0 and "401" in wrong.stderr  # refused, said so, no traceback
    assert "Traceback" not in wrong.stderr


def test_the_transformers_backend_serves_the_same_contract(stack: Stack):
    """The fallback engine behind the same routes: vLLM is the default, transformers stays tested."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    args = ["serve", "--config", str(stack.root / "config.yaml"), "--port", str(port)]
    args += ["--set", "policy.generation.backend=transformers"]
    with service("server-transformers", args, f"{endpoint}/v2/health/ready", stack.root / "logs"):
        assert httpx.get(f"{endpoint}/served", timeout=10).json()["engine"].startswith("transformers")
        body = {"instances": [_instance(r) for r in stack.requests[:4]]}
        reply = httpx.post(f"{endpoint}/v1/models/policy:predict", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        predictions = reply.json()["predictions"]
        assert [p["request_id"] for p in predictions] == [r.request_id for r in stack.requests[:4]]
        assert all(p["policy_version"] == "1" and p["format_errors"] == 0 for p in predictions)
    assert httpx.get(f"{stack.endpoint}/served", timeout=10).json()["engine"].startswith("vllm")


def test_a_challenger_trained_on_the_champion_is_served_as_its_adapter(stack: Stack, pi0, tmp_path):
    """A DPO version (merged weights + adapter, tagged with the version it was trained on) enters the
    canary: with `serving.challenger_adapter` on, the server puts its adapter on the champion's engine
    instead of starting a second one (off by default: see the setting; `tests/test_loop.py` serves
    the challenger as a model of its own).
    """
    from llm_auction.policy.lora import attach_lora, merge_adapter, save_adapter
    from llm_auction.policy.model import load_policy, save_policy
    from llm_auction.tracking.runs import tracked_run

    settings, name = stack.settings, stack.settings.irpo.registered_model
    model, tokenizer = load_policy(pi0[0])
    adapted = attach_lora(model, settings.policy.lora)
    for weight_name, weight in adapted.named_parameters():
        if "lora_B" in weight_name:
            weight.data.normal_(0, 0.05)
    save_adapter(adapted, tmp_path / "policy" / registry.ADAPTER_DIR)
    save_policy(merge_adapter(adapted), tokenizer, tmp_path / "policy")
    with tracked_run(settings.tracking, "irpo-dpo") as run:
        run.log_artifacts(str(tmp_path / "policy"), "policy")
        version = registry.register_version(
            settings.tracking, name, run.run_id, "policy", tags={registry.BASE_VERSION_TAG: "1"}
        )
    registry.enter_canary(settings.tracking, name, version, "test")

    def served() -> dict:
        return httpx.get(f"{stack.endpoint}/served", timeout=10).json()

    assert served()["engine_lora_rank"] is None  # no adapter to serve: the engine runs without LoRA
    try:
        wait_until(lambda: served()["challenger_version"] == version, f"v{version} in the canary", 90)
        assert served()["challenger_adapter"] is True and served()["policy_version"] == "1"
        assert served()["engine_lora_rank"] == engine_lora_rank(
            settings.policy.lora.r
        )  # restarted able to serve it
        body = {"instances": [_instance(r) for r in stack.requests]}
        reply = httpx.post(stack.predict_url, json=body, headers=AUTH, timeout=120)
        assert reply.status_code == 200, reply.text
        arms = {(p["arm"], p["policy_version"]) for p in reply.json()["predictions"]}
        assert arms == {("champion", "1"), ("challenger", version)}
        assert all(p["format_errors"] == 0 for p in reply.json()["predictions"])
    finally:
        registry.end_canary(settings.tracking, name, version, "rollback", "test over", "test")
    wait_until(lambda: served()["challenger_version"] is None, "the canary to end", 60)


def test_the_server_follows_the_champion_alias(stack: Stack, pi0):
    settings = stack.settings
    name = settings.irpo.registered_model

    def served() -> dict:
        return httpx.get(f"{stack.endpoint}/served", timeout=10).json()

    assert served()["policy_version"] == "1"
    version = register_champion(settings, pi0[0], reason="a new champion")
    wait_until(lambda: served()["policy_version"] == version, f"the server to load v{version}", timeout_s=60)
    reply = httpx.post(
        stack.predict_url, json={"instances": [_instance(stack.requests[2])]}, headers=AUTH, timeout=60
    )
    assert reply.json()["predictions"][0]["policy_version"] == version
    registry.rollback(settings.tracking, name, "test", "back to pi_0")
    wait_until(lambda: served()["policy_version"] == "1", "the server to roll back to v1", timeout_s=60)
