"""The closed loop end to end: pi_0 serves, clicks come back, psi_0, one irpo-epoch run, the report."""

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


def test_one_epoch_of_the_closed_loop(pi0, tmp_path):
    config = {**TINY_EPOCH, "loop": {"bootstrap_requests": 120, "requests_per_epoch": 80}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    report = run_loop(1, out, tmp_path / "config.yaml", pi0=pi0[0])

    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report, default=str))
    first, last = report["epochs"]
    assert (first["epoch"], first["policy_version"], first["gate"]) == (0, "1", None)
    assert last["epoch"] == 1 and isinstance(last["gate"]["promoted"], bool)
    assert last["gate"]["checks"] and all({"name", "passed"} <= set(c) for c in last["gate"]["checks"])
    assert last["policy_version"] == ("2" if last["gate"]["promoted"] else "1")
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

    bootstrap, epoch = report["traffic"]
    assert (bootstrap["served"], bootstrap["failed"], bootstrap["policy_versions"]) == (120, 0, {"1": 120})
    assert (epoch["served"], epoch["failed"]) == (80, 0)
    assert bootstrap["clicks_acknowledged"] == bootstrap["clicks"] > 0

    store = EventStore(out / "collector")
    try:
        predictions = [p for _, _, response in store.inference_pairs() for p in response["predictions"]]
    finally:
        store.close()
    assert len(predictions) == 200
    priced = [a for p in predictions[120:] for a in p["allocation"]]  # served after psi_0 was registered
    assert priced and all(
        a["expected_payment"] == pytest.approx(expected_payments([a["bid"]], [a["pctr"]])[0]) for a in priced
    )
    assert all(a["expected_payment"] is None for p in predictions[:120] for a in p["allocation"])

    html = (out / "report.html").read_text()
    assert "pre_generation (deployable, ranked by psi_t)" in html
    assert "oracle_greedy (oracle reference, simulation only)" in html and "R (psi)" in html
    assert html.count("<img") == 2 and (out / "epochs.png").is_file() and (out / "traffic.png").is_file()
