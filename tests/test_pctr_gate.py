"""psi's promotion gate: a new pCTR version takes the `champion` alias (what the server prices with)
only when it is no worse than the champion psi on the same held-out rows."""

import json
import math
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from helpers import HashEncoder, random_traffic_frame
from llm_auction.config import PCTRGateConfig, Settings, load_config
from llm_auction.reward.gate import HOLD, PROMOTE, decide_pctr
from llm_auction.reward.pctr import split_by_request
from llm_auction.reward.training import train_and_register
from llm_auction.serving.server import current_versions
from llm_auction.tracking import registry

CFG = PCTRGateConfig(max_auc_drop=0.01, max_ece_increase=0.01)


def metrics(auc: float, ece: float, n: int = 500) -> dict:
    return {"auc": auc, "ece": ece, "log_loss": 0.4, "n": n}


def test_a_better_psi_is_promoted():
    d = decide_pctr(metrics(0.66, 0.010), metrics(0.64, 0.020), CFG, "3")
    assert d.decision == PROMOTE and d.promote
    assert d.auc_delta == pytest.approx(0.02) and d.ece_delta == pytest.approx(-0.01)
    assert "within margins of champion v3" in d.reason and "500 test rows" in d.reason


def test_an_auc_drop_beyond_the_margin_holds_and_names_auc_and_the_numbers():
    d = decide_pctr(metrics(0.62, 0.010), metrics(0.65, 0.010), CFG, "3")
    assert d.decision == HOLD and not d.promote
    assert d.reason.startswith("AUC fell 0.0300") and "0.6200 vs champion v3's 0.6500" in d.reason
    assert "max_auc_drop 0.01" in d.reason and "ECE" not in d.reason
    tags = d.tags()
    assert tags["gate_decision"] == "hold" and tags["champion_auc_same_rows"] == "0.6500"
    assert tags["auc_delta"] == "-0.0300" and tags["test_auc"] == "0.6200"


def test_an_ece_rise_beyond_the_margin_holds():
    d = decide_pctr(metrics(0.66, 0.045), metrics(0.65, 0.020), CFG, "3")
    assert d.decision == HOLD
    assert d.reason.startswith("ECE rose 0.0250") and "max_ece_increase 0.01" in d.reason


def test_both_failures_are_named():
    d = decide_pctr(metrics(0.60, 0.050), metrics(0.65, 0.020), CFG, "3")
    assert d.decision == HOLD and "AUC fell" in d.reason and "ECE rose" in d.reason


def test_a_small_loss_within_the_margins_promotes():
    d = decide_pctr(metrics(0.645, 0.027), metrics(0.65, 0.020), CFG, "3")
    assert d.decision == PROMOTE and d.auc_delta == pytest.approx(-0.005)
    # the margins are the config's: a stricter gate holds the same numbers
    strict = PCTRGateConfig(max_auc_drop=0.001, max_ece_increase=0.001)
    assert decide_pctr(metrics(0.645, 0.027), metrics(0.65, 0.020), strict, "3").decision == HOLD


def test_the_first_version_is_promoted():
    d = decide_pctr(metrics(0.55, 0.2), None, CFG)
    assert d.decision == PROMOTE and d.reason == "first pCTR version: no champion yet"
    assert d.champion_version is None and math.isnan(d.champion_auc) and math.isnan(d.auc_delta)
    assert d.tags()["champion_auc_same_rows"] == "nan"


def test_a_non_finite_candidate_is_held_but_a_first_one_is_promoted_saying_so():
    one_class = metrics(float("nan"), 0.01, n=12)  # the test split saw no click: AUC undefined
    held = decide_pctr(one_class, metrics(float("nan"), 0.01, n=12), CFG, "3")
    assert held.decision == HOLD and "test AUC not finite (12 test rows" in held.reason
    first = decide_pctr(one_class, None, CFG)
    assert first.decision == PROMOTE and "first pCTR version" in first.reason
    assert "AUC is not finite" in first.reason and "promoted unmeasured" in first.reason


def test_a_champion_that_cannot_be_measured_is_no_bar():
    d = decide_pctr(metrics(0.6, 0.02), metrics(float("nan"), 0.02), CFG, "3")
    assert d.decision == PROMOTE and "champion v3 has no finite AUC/ECE" in d.reason


def test_the_margins_are_validated_config():
    with pytest.raises(ValueError, match="max_auc_drop"):
        PCTRGateConfig(max_auc_drop=-0.1)
    assert load_config(environ={}).pctr.gate.max_ece_increase == 0.01


# --- with a real MLflow registry -----------------------------------------------------------


@pytest.fixture(scope="module")
def world() -> tuple[Settings, object, HashEncoder]:
    """A small simulated world's random-insertion traffic as a pCTR frame, and a stand-in for phi
    (what phi knows is not the gate's business; a real encoder would triple the test's time)."""
    settings = load_config(
        environ={},
        overrides={"world": {"n_requests": 1500}, "pctr": {"max_epochs": 8}, "tracking": {"uri": None}},
    )
    _, frame, _ = random_traffic_frame(settings)
    return settings, frame, HashEncoder()


def _tracked(settings: Settings, tmp_path: Path) -> Settings:
    tracking = settings.tracking.model_copy(
        update={"uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "artifacts")}
    )
    return settings.model_copy(update={"tracking": tracking})


def test_without_tracking_the_gate_is_skipped_and_says_so(world, tmp_path: Path):
    settings, frame, encoder = world
    _, card = train_and_register(settings, frame, encoder, tmp_path / "pctr")
    assert card["gate"]["decision"] == "skipped" and "tracking.uri is None" in card["gate"]["reason"]
    assert json.loads((tmp_path / "pctr" / "pctr_card.json").read_text())["gate"]["decision"] == "skipped"


def test_a_bad_psi_is_held_and_a_good_one_takes_the_alias(world, tmp_path: Path):
    settings, frame, encoder = world
    settings = _tracked(settings, tmp_path)
    name = settings.pctr.registered_model
    client = MlflowClient(tracking_uri=settings.tracking.uri)

    _, first = train_and_register(settings, frame, encoder, tmp_path / "v1", {"epoch": 0})
    assert first["gate"]["decision"] == PROMOTE and first["gate"]["reason"].startswith("first pCTR version")
    assert (
        registry.alias_version(settings.tracking, name, registry.CHAMPION)
        == first["registered_version"]
        == "1"
    )
    assert current_versions(settings) == (None, None, "1")  # the server prices with the pCTR champion
    assert client.get_run(first["mlflow_run_id"]).data.params["gate.max_auc_drop"] == "0.01"

    # A broken label join: clicks inverted on the train and validation rows only, so both psis are
    # measured on the true clicks of the same test rows. The result ranks and calibrates badly.
    split = split_by_request(frame["request_id"], settings.pctr)
    bad = frame.copy()
    bad.loc[split != "test", "clicked"] = 1 - bad.loc[split != "test", "clicked"]
    _, held = train_and_register(settings, bad, encoder, tmp_path / "v2", {"epoch": 1})
    gate = held["gate"]
    assert held["registered_version"] == "2" and gate["decision"] == HOLD and not gate["promoted"]
    assert "ECE rose" in gate["reason"] and gate["champion_before"] == gate["champion_after"] == "1"
    assert gate["ece_delta"] > CFG.max_ece_increase
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == "1"  # did not move
    assert current_versions(settings) == (None, None, "1")  # the newest version (2) does not serve
    # the champion was measured on the same rows: its numbers there are its own test metrics
    assert gate["champion_auc"] == pytest.approx(first["test_auc"])
    assert gate["champion_ece"] == pytest.approx(first["test_ece"]) and gate["n"] == first["test_n"]
    version = client.get_model_version(name, "2")
    assert version.tags["gate_decision"] == "hold" and "ECE rose" in version.tags["gate_reason"]
    assert float(version.tags["champion_auc_same_rows"]) == pytest.approx(first["test_auc"], abs=1e-4)
    assert float(version.tags["test_ece"]) == pytest.approx(held["test_ece"], abs=1e-4)
    assert "held: champion stays v1" in version.description and "test AUC" in version.description
    assert "promoted_by" not in version.tags
    card = json.loads((tmp_path / "v2" / "pctr_card.json").read_text())
    assert card["gate"]["decision"] == HOLD and card["gate"]["champion_after"] == "1"

    _, good = train_and_register(settings, frame, encoder, tmp_path / "v3", {"epoch": 2})
    assert good["gate"]["decision"] == PROMOTE and good["gate"]["champion_after"] == "3"
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == "3"
    assert current_versions(settings) == (None, None, "3")
    promoted = client.get_model_version(name, "3")
    assert promoted.tags["gate_decision"] == "promote" and promoted.tags["promoted_by"] == "pctr-gate"
    assert (
        promoted.tags["previous_champion"] == "1" and "promoted to champion (was v1)" in promoted.description
    )
    # the gate's promotions are ordinary champion history: a rollback returns to v1
    assert registry.rollback(settings.tracking, name, "test", "check") == ("3", "1")
