"""The canary split on a real server: two registered policies, the real collector, real Feast.

pi_0 is the champion and a perturbed copy of it the challenger (two real models, two registry
versions). The challenger enters the canary while the server runs (no restart), answers
`serving.canary_percent` of the users by a stable hash, every answer and logged inference names
its arm and version, the collector's store and `/metrics` count each arm, `llm-auction canary
status` shows them, and a rollback removes the challenger from serving again.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import httpx
import pytest
import torch

from helpers import pi0_world_config, register_champion
from llm_auction.config import load_config
from llm_auction.evaluation.canary import canary_outcomes
from llm_auction.policy.model import load_policy
from llm_auction.serving.collector import EventStore
from llm_auction.serving.export import feedback_frames
from llm_auction.simulator.experiment import build_environment, export_public
from llm_auction.simulator.loop import sign_up
from llm_auction.simulator.services import free_port, service, wait_until
from llm_auction.tracking import registry

pytestmark = pytest.mark.slow

CANARY_PERCENT = 20
N_REQUESTS = 2000


def perturbed_copy(pi0_dir, into):
    """A second real policy: pi_0's weights with small noise (a different sampler, same tokenizer)."""
    shutil.copytree(pi0_dir, into)
    model, _ = load_policy(into)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    model.save_pretrained(into)
    return into


def test_two_policies_split_by_user_behind_one_server(pi0, tmp_path):
    root = tmp_path
    # 2,000 users, so 2,000 requests can each come from a different user (the split's unit).
    config = pi0_world_config(
        root,
        world={"n_users": N_REQUESTS},
        tracking={"uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts")},
        serving={"reload_interval_s": 0.5, "canary_percent": CANARY_PERCENT, "max_instances": 64},
    )
    settings = load_config(config, environ={})
    env = build_environment(settings)
    name = settings.irpo.registered_model
    champion = register_champion(settings, pi0[0])
    challenger = register_champion(settings, perturbed_copy(pi0[0], root / "challenger"), "to be rolled back")
    registry.rollback(settings.tracking, name, "test", "pi_0 stays champion")  # v2: registered, not serving
    export_public(env, settings.public_dir)
    sign_up(settings, root / "feedback")

    users = sorted(env.world.users["user_id"])
    assert len(users) == N_REQUESTS
    base = env.world.auction_requests(limit=N_REQUESTS)
    instances = [
        {**r.model_dump(mode="json"), "request_id": f"split-{i}", "user_id": users[i]}
        for i, r in enumerate(base)
    ]
    collector_port, server_port = free_port(), free_port()
    collector, endpoint = f"http://127.0.0.1:{collector_port}", f"http://127.0.0.1:{server_port}"
    collector_args = ["collector", "--store", str(root / "collector"), "--port", str(collector_port)]
    server_args = ["serve", "--config", str(config), "--port", str(server_port)]
    server_args += ["--logger-url", f"{collector}/v1/events"]

    def served() -> dict:
        return httpx.get(f"{endpoint}/served", timeout=10).json()

    async def predict_all(batch: list[dict]) -> list[dict]:
        limits = asyncio.Semaphore(4)
        async with httpx.AsyncClient(timeout=300) as client:

            async def one(chunk: list[dict]) -> list[dict]:
                async with limits:
                    reply = await client.post(
                        f"{endpoint}/v1/models/policy:predict", json={"instances": chunk}
                    )
                    reply.raise_for_status()
                    return reply.json()["predictions"]

            chunks = [batch[i : i + 50] for i in range(0, len(batch), 50)]
            return [p for part in await asyncio.gather(*map(one, chunks)) for p in part]

    with (
        service("collector", collector_args, f"{collector}/healthz", root / "logs"),
        service("server", server_args, f"{endpoint}/v2/health/ready", root / "logs"),
    ):
        assert served()["challenger_version"] is None
        registry.enter_canary(settings.tracking, name, challenger, "test")  # while the server runs
        wait_until(lambda: served()["challenger_version"] == challenger, "the challenger to load", 60)
        assert served()["canary_percent"] == CANARY_PERCENT and served()["policy_version"] == champion

        predictions = asyncio.run(predict_all(instances))
        assert [p["request_id"] for p in predictions] == [i["request_id"] for i in instances]
        arm_of = {i["user_id"]: p["arm"] for i, p in zip(instances, predictions)}
        for p in predictions:
            assert p["policy_version"] == {"champion": champion, "challenger": challenger}[p["arm"]]
        share = 100 * sum(p["arm"] == "challenger" for p in predictions) / len(predictions)
        assert abs(share - CANARY_PERCENT) <= 2, f"challenger answered {share:.1f}% of {len(predictions)}"
        assert len({p["response"] for p in predictions if p["arm"] == "challenger"}) > 1

        # The same users again, in another order and other batches: each gets the arm it had.
        again = [{**i, "request_id": f"again-{k}"} for k, i in enumerate(reversed(instances[:300]))]
        for i, p in zip(again, asyncio.run(predict_all(again))):
            assert p["arm"] == arm_of[i["user_id"]], i["user_id"]

        total = len(instances) + len(again)
        store = EventStore(root / "collector")
        try:
            wait_until(
                lambda: len(canary_outcomes(*feedback_frames(store))) == total, "every logged request", 60
            )
            outcomes = canary_outcomes(*feedback_frames(store))
        finally:
            store.close()
        counts = outcomes.groupby(["arm", "policy_version"]).size().to_dict()
        expected = sum(p["arm"] == "challenger" for p in predictions) + sum(
            arm_of[i["user_id"]] == "challenger" for i in again
        )
        assert counts == {("challenger", challenger): expected, ("champion", champion): total - expected}
        metrics = httpx.get(f"{collector}/metrics", timeout=10).text
        line = f'collector_arm_requests{{arm="challenger",policy_version="{challenger}"}} {float(expected)}'
        assert line in metrics

        status = subprocess.run(
            [sys.executable, "-m", "llm_auction", "canary", "status", "--store", str(root / "collector"),
             "--config", str(config)],
            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=300,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert f"challenger v{challenger} vs champion v{champion}" in status.stdout
        assert "verdict: " in status.stdout and str(expected) in status.stdout

        registry.end_canary(settings.tracking, name, challenger, "rollback", "test: rolled back", "test")
        wait_until(lambda: served()["challenger_version"] is None, "the challenger to be removed", 60)
        after = asyncio.run(predict_all(instances[:100]))
        assert {p["arm"] for p in after} == {"champion"}
        tags = registry.show(settings.tracking, name)["versions"][0]["tags"]
        assert tags["canary.status"] == "rolled back" and tags["canary.reason"] == "test: rolled back"
