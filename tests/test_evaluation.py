"""Candidate evaluation and the gate step on a real policy, registry on sqlite."""

from __future__ import annotations

import json

import pytest

from conftest import untrained_scorer
from helpers import register_versions
from llm_auction.config import load_config
from llm_auction.evaluation.candidate import (
    compared_baselines,
    epoch_history,
    evaluate_candidate,
    write_evaluation_report,
)
from llm_auction.evaluation.card import review_card
from llm_auction.pipeline.steps.gate import gate_step
from llm_auction.simulator.experiment import Environment, split_requests, user_profiles
from llm_auction.tracking import registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def evaluation(pi0, policy_env):
    env = Environment(
        policy_env.settings.model_copy(
            update={
                "policy": policy_env.settings.policy.model_copy(update={"held_out_requests": 120}),
                "gate": policy_env.settings.gate.model_copy(update={"audit_requests": 2}),
            }
        ),
        policy_env.world,
        policy_env.ground_truth,
        policy_env.click_model,
    )
    directory = pi0[0]
    _, held_out = split_requests(env)
    profiles = user_profiles(env.world)
    return evaluate_candidate(
        env.settings, held_out, profiles, directory, directory, directory, untrained_scorer(env)
    )


@pytest.fixture(scope="module")
def summary(evaluation):
    return evaluation.summary


def test_a_candidate_identical_to_the_champion_is_held(summary):
    # Same model, same seed: the same responses, so the paired gain is exactly zero and KL is zero.
    assert summary["gain"]["reward"]["mean"] == 0 and summary["gain"]["reward"]["ci"] == [0, 0]
    assert abs(summary["kl"]) < 1e-4
    gate = summary["gate"]
    assert not gate["admitted"]
    assert [c["name"] for c in gate["checks"] if not c["passed"]] == ["reward gain lower bound"]
    assert set(summary["policies"]) == {"candidate", "champion", "pre_generation", "post_generation"}
    audit = summary["monotonicity"]
    assert audit["n_checks"] > 0 and audit["click_model"] == "psi_t"
    # how bids drive pi_0 (a change in insertion probability) and the audit's power, both measured
    assert (
        -1
        <= audit["bid_doubling"]["ci"][0]
        <= audit["bid_doubling"]["mean"]
        <= audit["bid_doubling"]["ci"][1]
        <= 1
    )
    assert 0 < audit["detectable_drop"] < 1 and audit["samples_per_level"] == 16
    assert "by construction" in summary["ir"]  # first price: IR is not a check that could fail


def test_the_policy_is_compared_with_what_it_learns_from():
    """Pre- and post-generation always; an anchor joins them, listed once, in PRICED's order."""
    assert compared_baselines(load_config(overrides={"irpo": {"anchors": []}})) == (
        "pre_generation",
        "post_generation",
    )
    anchored = load_config(overrides={"irpo": {"anchors": ["reward_greedy", "post_generation"]}})
    assert compared_baselines(anchored) == ("pre_generation", "post_generation", "reward_greedy")


def test_the_responses_of_every_policy_are_kept_for_the_oracle(evaluation):
    responses = evaluation.responses
    assert set(responses["policy"]) == set(evaluation.summary["policies"])
    per_policy = responses.groupby("policy")["request_id"].nunique()
    assert (per_policy == evaluation.summary["requests"]).all()


def test_the_report_and_the_review_card(evaluation, summary, tmp_path):
    history = epoch_history(load_config(environ={}, overrides={"tracking": {"uri": None}}), summary)
    assert [h["epoch"] for h in history] == [0, 1]
    paths = write_evaluation_report(evaluation, tmp_path, history)
    assert [p.name for p in paths] == [
        "evaluation.json", "responses.parquet", "comparison.png", "epochs.png", "report.html"
    ]  # fmt: skip
    html = (tmp_path / "report.html").read_text()
    assert "reward gain lower bound" in html and 'class="fail"' in html
    assert "doubling a bid: insertion probability" in html and "samples per bid level" in html
    card = review_card(summary, "llm-auction-policy v2", {"report": "runs:/abc/evaluation/report.html"})
    assert card.startswith("## llm-auction-policy v2") and "**Offline gate: HOLD**" in card
    assert "| candidate |" in card and "[report](runs:/abc/evaluation/report.html)" in card


def clear_summary() -> dict:
    """An evaluation whose every check clears (the shape `evaluate_candidate` returns)."""
    est = {"mean": 0.3, "ci": [0.28, 0.32]}
    inputs = {
        "gain_mean": 0.05, "gain_ci": [0.01, 0.09], "candidate_itctr": 0.18, "champion_itctr": 0.19,
        "ad_load": 1.8, "format_error_rate": 0.02, "kl": 0.7, "monotonicity_violation_rate": 0.0,
    }  # fmt: skip
    return {
        "requests": 500,
        "policies": {"candidate": {"revenue": est, "itctr": est}, "champion": {"revenue": est, "itctr": est}},
        "gain": {"reward": {"metric": "reward", "mean": 0.05, "ci": [0.01, 0.09]}, "revenue": est},
        "kl": 0.7,
        "monotonicity": {"n_checks": 40, "violations": 0, "violation_rate": 0.0},
        "ir": "first-price PPC is individually rational by construction",
        "gate_inputs": inputs,
        "lineage": {"epoch": 1},
    }


def test_the_gate_step_tags_the_version_and_admits_one_candidate_at_a_time_to_the_canary(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = {"uri": uri, "artifact_location": str(tmp_path / "artifacts")}
    settings = load_config(environ={}, overrides={"tracking": tracking})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "card.json").write_text("{}")
    name = settings.irpo.registered_model
    versions = register_versions(settings, tmp_path / "m", 3)
    registry.promote(settings.tracking, name, versions[0], "bootstrap", "pi_0")
    client = MlflowClient(tracking_uri=uri)

    failing = clear_summary()
    failing["gate_inputs"]["format_error_rate"] = 0.5
    held = gate_step(settings, failing, versions[1])
    assert not held["admitted"] and held["reason"] == "failed: format error rate"
    assert registry.alias_version(settings.tracking, name, "challenger") is None  # held: no canary
    assert registry.alias_version(settings.tracking, name, registry.HEAD) is None  # nor the next base

    admitted = gate_step(settings, clear_summary(), versions[1])
    assert admitted["admitted"] and json.loads(json.dumps(admitted))["reason"].endswith("enters the canary")
    assert str(client.get_model_version_by_alias(name, "challenger").version) == versions[1]
    assert str(client.get_model_version_by_alias(name, "champion").version) == versions[0]  # not promoted
    assert registry.alias_version(settings.tracking, name, registry.HEAD) == versions[1]  # next epoch's base
    version = client.get_model_version(name, versions[1])
    assert version.tags["gate.admitted"] == "true" and version.tags["lineage.epoch"] == "1"
    assert version.tags["gate.failed"] == "none" and version.tags["metric.gain_reward"] == "0.05"
    assert version.tags["canary.status"] == "running" and "canary.started_at" in version.tags
    assert version.description.startswith(f"## {name} v{versions[1]}")

    busy = gate_step(settings, clear_summary(), versions[2])  # one canary at a time
    assert not busy["admitted"] and busy["reason"] == "failed: canary slot free"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == versions[1]
    assert registry.alias_version(settings.tracking, name, registry.HEAD) == versions[1]


def test_the_drift_to_pi0_is_measured_against_the_lineages_root(tmp_path):
    from llm_auction.pipeline.steps.evaluate import initial_policy

    tracking = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts")}
    settings = load_config(environ={}, overrides={"tracking": tracking})
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "card.json").write_text('{"policy": "pi_0"}')
    reference = tmp_path / "reference"
    pi0, later = register_versions(settings, tmp_path / "m", 2)
    assert initial_policy(settings, later, reference, tmp_path / "into") is None  # no pi_0 registered
    registry.set_alias(settings.tracking, settings.irpo.registered_model, registry.INITIAL, pi0)
    assert initial_policy(settings, pi0, reference, tmp_path / "into") == reference  # read once, not twice
    fetched = initial_policy(settings, later, reference, tmp_path / "into")
    assert json.loads((fetched / "card.json").read_text()) == {"policy": "pi_0"}
    assert fetched.is_relative_to(tmp_path / "into")
