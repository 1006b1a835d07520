"""The closed loop end to end: pi_0 serves, clicks come back, psi_0, one irpo-epoch run, the
candidate's canary on live traffic beside the champion, the report."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import TINY_EPOCH
from llm_auction.mechanism.payments import expected_payments
from llm_auction.serving.collector import EventStore
from llm_auction.simulator.loop import run_loop

pytestmark = pytest.mark.slow

METRICS = ("revenue", "social_welfare", "itctr", "ad_load")


def test_one_epoch_of_the_closed_loop(pi0, tmp_path, capfd):
    # An offline gate that admits any candidate, so the canary always runs: what it decides is
    # live traffic's business (50 requests: too few for a verdict, so it must end inconclusive).
    admit_all = {
        "min_gain": -1e9, "max_kl": 1e9, "max_format_error_rate": 1.0, "max_ad_load": 10.0,
        "itctr_margin": 0.99, "max_monotonicity_violation_rate": 1.0,
    }  # fmt: skip
    config = {
        **TINY_EPOCH,
        "loop": {"bootstrap_requests": 100, "requests_per_epoch": 50},
        "gate": {**TINY_EPOCH["gate"], **admit_all},
        "serving": {"canary_percent": 50},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    report = run_loop(1, out, tmp_path / "config.yaml", pi0=pi0[0])

    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report, default=str))
    first, last = report["epochs"]
    assert (first["epoch"], first["policy_version"], first["gate"]) == (0, "1", None)
    assert last["epoch"] == 1 and last["gate"]["admitted"] is True
    assert last["gate"]["checks"] and all({"name", "passed"} <= set(c) for c in last["gate"]["checks"])
    canary = last["canary"]
    assert (canary["challenger"], canary["champion"]) == ("2", "1")
    assert canary["decision"] == "inconclusive" and canary["reason"].startswith("too few requests")
    assert last["policy_version"] == "1"  # not promoted: the champion stays
    arms = canary["arms"]
    assert arms["challenger"]["policy_versions"] == ["2"] and arms["champion"]["policy_versions"] == ["1"]
    for entry in report["epochs"]:
        assert first["held_out_requests"] == entry["held_out_requests"] == 100
        for rows in (entry["policy"], *entry["baselines"].values()):
            for metric in METRICS:
                lo, hi = rows[metric]["ci"]
                assert lo <= rows[metric]["mean"] <= hi
        assert set(entry["baselines"]) == {"pre_generation", "post_generation"}  # deployable: ranked by psi
        assert set(entry["oracle_references"]) == {
            "pre_generation@oracle",
            "post_generation@oracle",
            "oracle_greedy",
        }
        assert set(entry["baselines_reward_model"]) == set(entry["baselines"])
        assert entry["reward_model"]["reward"] == entry["policy"]["reward"]  # R under psi beside the oracle
        greedy = entry["oracle_references"]["oracle_greedy"]["revenue"]["mean"]
        assert greedy >= entry["baselines"]["pre_generation"]["revenue"]["mean"]
    assert "simulation only" in report["sections"]["policy"] and "psi_t" in report["sections"]["baselines"]
    assert report["final_served"]["policy_version"] == last["policy_version"]  # the server followed the gate

    bootstrap, epoch, final = report["traffic"]
    assert (bootstrap["served"], bootstrap["failed"], bootstrap["policy_versions"]) == (100, 0, {"1": 100})
    assert (epoch["served"], epoch["failed"], epoch["policy_versions"]) == (50, 0, {"1": 50})  # no canary yet
    assert (final["phase"], final["served"], final["failed"]) == ("final canary", 50, 0)
    split = final["policy_versions"]
    assert set(split) == {"1", "2"} and split == {
        "1": arms["champion"]["requests"],
        "2": arms["challenger"]["requests"],
    }  # the canary's per-arm volumes are the traffic each arm answered
    assert bootstrap["clicks_acknowledged"] == bootstrap["clicks"] > 0

    store = EventStore(out / "collector")
    try:
        pairs = store.inference_pairs()
        predictions = [p for _, _, response in pairs for p in response["predictions"]]
    finally:
        store.close()
    assert len(predictions) == 200
    by_user: dict[str, set[str]] = {}
    for p in predictions:
        assert p["arm"] in ("champion", "challenger") and p["policy_version"] == (
            "2" if p["arm"] == "challenger" else "1"
        )
    users = {r["request_id"]: r["user_id"] for _, q, _ in pairs for r in q["instances"]}
    for p in predictions[150:]:
        by_user.setdefault(users[p["request_id"]], set()).add(p["arm"])
    assert all(len(a) == 1 for a in by_user.values())  # a user sees one arm
    priced = [a for p in predictions[100:] for a in p["allocation"]]  # served after psi_0 was registered
    assert priced and all(
        a["expected_payment"] == pytest.approx(expected_payments([a["bid"]], [a["pctr"]])[0]) for a in priced
    )
    assert all(a["expected_payment"] is None for p in predictions[:100] for a in p["allocation"])

    html = (out / "report.html").read_text()
    assert "pre_generation (deployable, ranked by psi_t)" in html
    assert "oracle_greedy (oracle reference, simulation only)" in html and "R (psi)" in html
    assert "each epoch&#x27;s candidate in canary" in html or "each epoch's candidate in canary" in html
    assert html.count("<img") == 3 and (out / "canary-epoch-1.png").is_file()

    # Where the time went: every phase, the pipeline's steps by name, nothing beyond the wall time.
    timings = report["timings"]
    phases = {r["phase"] for r in timings}
    assert {"bootstrap", "epoch 1", "final canary"} <= phases
    steps = {r["step"] for r in timings if r["phase"] == "epoch 1"}
    assert {"traffic", "pipeline: canary", "pipeline: train-dpo", "pipeline: evaluate"} <= steps
    assert all(r["seconds"] >= 0 for r in timings)
    assert sum(r["seconds"] for r in timings) <= report["wall_seconds"]
    assert "where the time went" in html
    # The console shows the loop's progress, not kfp.local's executor input or the steps' output:
    # those are in the run's log file.
    printed = capfd.readouterr().out
    assert "Executing task" not in printed and "executorInput" not in printed
    assert "Executing task" in (out / "logs" / "pipeline-epoch-1.log").read_text()
