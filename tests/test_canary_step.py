"""The canary step on a real registry: promote, roll back, end inconclusive, wait for approval.

The feedback store is written as the collector's export writes it (request log with arm and
version, impressions, clicks); the step reads only that and the registry, like the pipeline's.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from helpers import register_versions
from llm_auction.config import load_config
from llm_auction.contracts import AdCandidate, AuctionRequest
from llm_auction.pipeline.steps import canary as canary_step
from llm_auction.public.feedback import CLICK_COLUMNS, IMPRESSION_COLUMNS, request_rows, write_feedback
from llm_auction.serving.split import arm_for
from llm_auction.tracking import registry


def live_traffic(feedback, champion: str, challenger: str, ctr: dict[str, float], n: int, seed: int = 0):
    """`n` requests from distinct users split 50/50 by the server's hash, one ad each at bid 1.0,
    clicked with probability `ctr[arm]`; written as one batch of the feedback store."""
    rng = np.random.default_rng(seed)
    now = pd.Timestamp.now(tz="UTC") + pd.Timedelta(seconds=5)  # after the canary started
    requests, arms, versions, impressions, clicks = [], [], [], [], []
    for i in range(n):
        ad = AdCandidate(ad_id="a1", advertiser_id="adv1", text="an ad", bid=1.0)
        request = AuctionRequest(request_id=f"r{i}", user_id=f"u{i}", query="q", ads=[ad])
        arm = arm_for(request.user_id, 50, salt=challenger)
        version = challenger if arm == "challenger" else champion
        requests.append(request), arms.append(arm), versions.append(version)
        impressions.append(
            (
                f"imp:resp{i}:a1",
                now,
                f"r{i}",
                f"resp{i}",
                f"u{i}",
                "a1",
                "adv1",
                1,
                1,
                1.0,
                version,
                "q",
                "text",
            )
        )
        if rng.random() < ctr[arm]:
            clicks.append((f"click:{i}", now, f"r{i}", f"resp{i}", "a1"))
    write_feedback(
        feedback,
        f"batch-{seed}",
        pd.DataFrame(impressions, columns=list(IMPRESSION_COLUMNS)),
        pd.DataFrame(clicks, columns=list(CLICK_COLUMNS)),
        request_rows(requests, [now] * n, arms, versions),
    )


@pytest.fixture
def canary_registry(tmp_path):
    def make(mode: str = "auto"):
        tracking = {
            "uri": f"sqlite:///{tmp_path}/mlflow.db",
            "artifact_location": str(tmp_path / "artifacts"),
        }
        overrides = {"tracking": tracking, "data_dir": str(tmp_path / "data"), "gate": {"mode": mode}}
        settings = load_config(environ={}, overrides=overrides)
        (tmp_path / "m").mkdir(exist_ok=True)
        (tmp_path / "m" / "card.json").write_text("{}")
        champion, challenger = register_versions(settings, tmp_path / "m", 2)
        name = settings.irpo.registered_model
        registry.promote(settings.tracking, name, champion, "bootstrap", "pi_0")
        registry.enter_canary(settings.tracking, name, challenger, "test")
        return settings, champion, challenger

    return make


def _decide(settings, tmp_path, end: bool = False) -> dict:
    return canary_step.canary(
        settings.model_dump_json(), str(tmp_path / "feedback"), "", str(tmp_path / "out"), "", end, "test"
    )


@pytest.mark.parametrize(
    ("ctr", "decision", "champion_after"),
    [
        ({"champion": 0.05, "challenger": 0.30}, "promote", "challenger"),
        ({"champion": 0.30, "challenger": 0.05}, "rollback", "champion"),
    ],
)
def test_the_verdict_moves_the_aliases_and_is_recorded(
    canary_registry, tmp_path, ctr, decision, champion_after
):
    settings, champion, challenger = canary_registry()
    live_traffic(tmp_path / "feedback", champion, challenger, ctr, 1000)
    result = _decide(settings, tmp_path)
    name = settings.irpo.registered_model
    assert result["decision"] == decision, result["reason"]
    assert sum(a["requests"] for a in result["arms"].values()) == 1000
    expected = {"champion": champion, "challenger": challenger}[champion_after]
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == expected
    assert registry.alias_version(settings.tracking, name, registry.CHALLENGER) is None  # canary over
    tags = registry.show(settings.tracking, name)["versions"][0]["tags"]
    assert tags["canary.status"] == {"promote": "promoted", "rollback": "rolled back"}[decision]
    assert tags["canary.reason"] == result["reason"] and float(tags["canary.requests"]) == 1000
    card = registry.show(settings.tracking, name)["versions"][0]["description"]
    assert f"## Canary: {decision}" in card and "| challenger | v2 |" in card  # on the review card
    saved = json.loads((tmp_path / "out" / canary_step.CANARY_FILE).read_text())
    assert saved["decision"] == decision and (tmp_path / "out" / canary_step.CANARY_PLOT).is_file()
    assert _decide(settings, tmp_path)["decision"] == "none"  # decided once; nothing left in canary


@pytest.mark.parametrize(
    ("ctr", "n", "decision", "improves"),
    [
        ({"champion": 0.05, "challenger": 0.30}, 1000, "promote", "champion"),
        ({"champion": 0.30, "challenger": 0.05}, 1000, "rollback", "champion"),
        ({"champion": 0.10, "challenger": 0.10}, 300, "inconclusive", "head"),
    ],
)
def test_the_next_epoch_improves_the_head_unless_live_traffic_settled_it(
    canary_registry, tmp_path, ctr, n, decision, improves
):
    settings, champion, challenger = canary_registry()
    name = settings.irpo.registered_model
    registry.set_alias(settings.tracking, name, registry.HEAD, challenger)  # as the gate step leaves it
    live_traffic(tmp_path / "feedback", champion, challenger, ctr, n)
    assert _decide(settings, tmp_path, end=True)["decision"] == decision
    champion_uri = f"models:/{name}@champion"
    head = registry.alias_version(settings.tracking, name, registry.HEAD)
    assert head == (challenger if improves == "head" else None)  # promoted: it is the champion now
    expected = f"models:/{name}/{challenger}" if improves == "head" else champion_uri
    compounding, waiting = (
        settings.model_copy(update={"irpo": settings.irpo.model_copy(update={"start_policy": start})})
        for start in ("head", "champion")
    )
    assert canary_step.start_policy(compounding) == {"policy_uri": expected, "champion_uri": champion_uri}
    assert canary_step.start_policy(waiting)["policy_uri"] == champion_uri  # waits for live proof
    assert canary_step.start_policy(compounding, "models:/x/3")["policy_uri"] == "models:/x/3"  # given: kept


def test_an_interrupted_verdict_is_undone_and_taken_again_identically(canary_registry, tmp_path):
    # `run --resume` after a crash between the verdict's registry moves and the loop's record of it.
    settings, champion, challenger = canary_registry()
    live_traffic(tmp_path / "feedback", champion, challenger, {"champion": 0.05, "challenger": 0.30}, 1000)
    name, pctr = settings.irpo.registered_model, settings.pctr.registered_model
    before = registry.snapshot(settings.tracking, [name, pctr])
    assert before == {
        name: {"aliases": {"champion": champion, "challenger": challenger}, "history": champion}
    }
    first = _decide(settings, tmp_path)
    assert first["decision"] == "promote"
    moved = registry.snapshot(settings.tracking, [name])[name]
    assert moved == {"aliases": {"champion": challenger}, "history": f"{champion},{challenger}"}
    registry.restore(settings.tracking, before)
    assert registry.snapshot(settings.tracking, [name, pctr]) == before
    again = _decide(settings, tmp_path)
    assert (again["decision"], again["reason"]) == (first["decision"], first["reason"])
    assert registry.snapshot(settings.tracking, [name])[name] == moved  # promoted once, not twice


def test_no_verdict_keeps_collecting_until_the_canary_ends(canary_registry, tmp_path):
    settings, champion, challenger = canary_registry()
    live_traffic(tmp_path / "feedback", champion, challenger, {"champion": 0.1, "challenger": 0.1}, 300)
    name = settings.irpo.registered_model
    going = _decide(settings, tmp_path)
    assert going["decision"] == "continue"
    assert registry.alias_version(settings.tracking, name, registry.CHALLENGER) == challenger  # still in
    ended = _decide(settings, tmp_path, end=True)
    assert ended["decision"] == "inconclusive"
    assert registry.alias_version(settings.tracking, name, registry.CHALLENGER) is None
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == champion


def test_manual_mode_promotes_only_once_approved(canary_registry, tmp_path):
    settings, champion, challenger = canary_registry("manual")
    live_traffic(tmp_path / "feedback", champion, challenger, {"champion": 0.05, "challenger": 0.30}, 1000)
    name = settings.irpo.registered_model
    waiting = _decide(settings, tmp_path, end=True)
    assert waiting["decision"] == "awaiting approval" and "approved=true" in waiting["reason"]
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == champion
    assert registry.alias_version(settings.tracking, name, registry.CHALLENGER) == challenger
    registry.approve(settings.tracking, name, challenger, "carol")
    assert _decide(settings, tmp_path)["decision"] == "promote"
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == challenger
    history = registry.show(settings.tracking, name)["champion_history"]
    assert history.split(",")[-2:] == [champion, challenger]  # rollback stays possible
