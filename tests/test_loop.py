"""The closed loop end to end: pi_0 serves, clicks come back, psi_0, one irpo-epoch run through
kfp.local (its steps blocked from the oracle side), the candidate's canary on live traffic beside
the champion, the report."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import TINY_EPOCH, oracle_blocked
from llm_auction.config import load_config
from llm_auction.features.encoder import TextEncoder, encoder_cache_path
from llm_auction.mechanism.payments import expected_payments
from llm_auction.serving.collector import EventStore
from llm_auction.simulator import loop as loop_module
from llm_auction.simulator.loop import run_loop
from llm_auction.simulator.run_state import STATE_FILE
from llm_auction.tracking import registry

pytestmark = pytest.mark.slow


class Crash(KeyboardInterrupt):
    """The loop's process stopped from outside (a node drained, someone pressed Ctrl-C)."""


def pipelines_without_the_oracle(monkeypatch, folder) -> None:
    """Every kfp.local step the loop starts runs with the simulator and the world unimportable (the
    services, started before, are production code and need neither)."""
    real = loop_module.run_local

    def run_local(*args, **kwargs):
        with oracle_blocked(folder):
            return real(*args, **kwargs)

    monkeypatch.setattr(loop_module, "run_local", run_local)


def assert_the_epochs_steps_left_their_outputs(out, settings) -> None:
    """What the irpo-epoch run of epoch 1 wrote: each step's artifact, the MLflow runs, the lineage."""
    from mlflow.tracking import MlflowClient

    (run_dir,) = (out / "pipeline" / "epoch-1").iterdir()
    pairs = json.loads(next(run_dir.glob("build-preferences/pairs/pairs_stats.json")).read_text())
    assert pairs["pairs"] > 0 and pairs["prompts_online"] > 0  # the prompts are the requests logged
    assert next(run_dir.glob("build-preferences/pairs/pairs.parquet")).is_file()
    assert next(run_dir.glob("train-pctr/pctr/pctr_config.json")).is_file()
    assert next(run_dir.glob("train-dpo/policy/adapter/adapter_model.safetensors")).is_file()
    evaluation = json.loads(next(run_dir.glob("evaluate/evaluation/evaluation.json")).read_text())
    assert "<html" in next(run_dir.glob("evaluate/report")).read_text().lower()
    assert set(evaluation["policies"]) == {"candidate", "champion", "pre_generation", "post_generation"}
    assert "psi_t" in evaluation["section"] and evaluation["monotonicity"]["click_model"] == "psi_t"
    assert evaluation["gate"]["admitted"] is True  # the test's gate admits any candidate
    # The epoch improved what it optimises: R under psi_1 on the held-out requests, paired with the
    # champion's responses to the same requests (psi from 150 requests is too rough for the oracle
    # to show it on 100 requests: the closed-loop runs measure that, README).
    gain = evaluation["gain"]["reward"]
    assert gain["ci"][0] > 0 and evaluation["kl"] > 0.01, (gain, evaluation["kl"])
    # No challenger served before this epoch: its canary step found nothing to decide.
    verdict = json.loads(next(run_dir.glob("canary/result/canary.json")).read_text())
    assert (verdict["champion"], verdict["challenger"], verdict["decision"]) == ("1", None, "none")

    client = MlflowClient(tracking_uri=settings.tracking.uri)
    experiment = client.get_experiment_by_name(settings.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "irpo-epoch-1"]
    assert parent.info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert {"ingest", "train-pctr", "irpo-pairs", "irpo-dpo", "evaluate"} <= children
    candidate = client.get_model_version(settings.irpo.registered_model, "2")
    assert candidate.tags["lineage.epoch"] == "1" and candidate.tags["gate.admitted"] == "true"
    # the psi its pairs were scored by: a registered version (MlflowException otherwise)
    client.get_model_version(settings.pctr.registered_model, candidate.tags["lineage.pctr_version"])


def interrupt_the_last_canary(monkeypatch, out, config, pi0) -> dict:
    """Run the loop twice into a crash, then resume it: once in the middle of the final canary's
    traffic (20 of its 50 requests served), once right after the verdict moved the registry.
    Returns the verdict the second crash cut off.
    """
    real_send, real_canary, cut = loop_module.send_traffic, loop_module.canary_step.canary, {}

    async def send(endpoint, requests, *args, seed, **kwargs):
        if seed == 2 and not kwargs.get("skip"):  # the final canary's phase, first try
            await real_send(endpoint, requests[:20], *args, seed=seed, **kwargs)
            raise Crash
        return await real_send(endpoint, requests, *args, seed=seed, **kwargs)

    def canary(*args, **kwargs):
        cut.update(real_canary(*args, **kwargs))
        raise Crash

    monkeypatch.setattr(loop_module, "send_traffic", send)
    with pytest.raises(Crash):
        run_loop(1, out, config, pi0=pi0)
    state = json.loads((out / STATE_FILE).read_text())
    assert "epoch 1" in state["finished"] and "traffic final canary" in state["begun"]
    monkeypatch.setattr(loop_module.canary_step, "canary", canary)
    with pytest.raises(Crash):
        run_loop(None, out, resume=True)
    assert (
        cut["decision"] == "inconclusive"
        and "final canary" in json.loads((out / STATE_FILE).read_text())["begun"]
    )
    monkeypatch.setattr(loop_module.canary_step, "canary", real_canary)
    return cut


METRICS = ("revenue", "social_welfare", "itctr", "ad_load")


def test_one_epoch_of_the_closed_loop_interrupted_and_resumed(pi0, tmp_path, capfd, monkeypatch):
    # An offline gate that admits any candidate, so the canary always runs: what it decides is
    # live traffic's business (50 requests: too few for a verdict, so it must end inconclusive).
    admit_all = {
        "min_gain": -1e9, "max_kl": 1e9, "max_format_error_rate": 1.0, "max_ad_load": 10.0,
        "itctr_margin": 0.99, "max_monotonicity_violation_rate": 1.0,
    }  # fmt: skip
    config = {
        **TINY_EPOCH,
        "irpo": {**TINY_EPOCH["irpo"], "n_prompts": 200},  # enough pairs for DPO to move (see below)
        # The ranking stage end to end: once psi_0 is registered the server lists each request's
        # ads by bid x psi and answers in the request's order (the pricing below checks the pairing).
        # At the code's temperature 1: the `local` profile's 0.5 makes the fixture's pi_0 put ads in
        # 21 of these 100 bootstrap answers once, too few requests for psi_0's three splits (the world
        # has no room for more: 200 requests between pi_0's SFT set and the held-out ones).
        "policy": {**TINY_EPOCH["policy"], "ranking": "ecpm", "generation": {"temperature": 1.0}},
        "loop": {"bootstrap_requests": 100, "requests_per_epoch": 50},
        "gate": {**TINY_EPOCH["gate"], **admit_all},
        "serving": {"canary_percent": 50},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    pipelines_without_the_oracle(monkeypatch, tmp_path / "oracle-blocked")
    cut = interrupt_the_last_canary(monkeypatch, out, tmp_path / "config.yaml", pi0[0])
    report = run_loop(None, out, resume=True)
    assert run_loop(None, out, resume=True) == report  # finished: nothing left to resume

    assert json.loads((out / "report.json").read_text()) == json.loads(json.dumps(report, default=str))
    first, last = report["epochs"]
    assert (first["epoch"], first["policy_version"], first["gate"]) == (0, "1", None)
    assert last["epoch"] == 1 and last["gate"]["admitted"] is True
    assert last["gate"]["checks"] and all({"name", "passed"} <= set(c) for c in last["gate"]["checks"])
    audit = last["candidate_monotonicity"]  # the candidate's response to a doubled bid, and the audit's power
    assert first["candidate_monotonicity"] is None and audit["n_checks"] > 0
    assert audit["bid_doubling"]["mean"] is not None and audit["detectable_drop"] > 0
    canary = last["canary"]
    assert (canary["challenger"], canary["champion"]) == ("2", "1")
    assert canary["decision"] == "inconclusive" and canary["reason"].startswith("too few requests")
    assert {k: cut[k] for k in ("decision", "reason", "requests")} == {
        k: canary[k] for k in ("decision", "reason", "requests")
    }  # the verdict the crash cut off, taken again on the same logs
    settings = load_config(out / "config.yaml")  # the run's own, stores under `out`
    assert_the_epochs_steps_left_their_outputs(out, settings)
    name = settings.irpo.registered_model
    after = registry.snapshot(settings.tracking, [name])[name]
    # The challenger left, nothing promoted; inconclusive, v2 stays the head a next epoch would improve.
    assert after == {"aliases": {"champion": "1", "head": "2", "pi0": "1"}, "history": "1"}
    assert last["candidate"]["version"] == "2" and last["candidate"]["improves"] == "1"  # the champion then
    assert last["candidate"]["kl_to_pi0"] == last["candidate"]["kl_to_reference"] > 0  # it improved pi_0
    assert last["candidate"]["reward_model"]["reward"] == last["candidate"]["policy"]["reward"]
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
            "reward_greedy@oracle",
            "oracle_greedy",
        }
        assert set(entry["baselines_reward_model"]) == set(entry["baselines"])
        assert entry["reward_model"]["reward"] == entry["policy"]["reward"]  # R under psi beside the oracle
        # how the simulator's users read each policy's pages (oracle side): the same ads, other clicks
        for page in (entry["policy"]["page"], *(b["page"] for b in entry["baselines"].values())):
            assert 0 <= page["talk"] <= page["useful"] + page["talk"] and 0 < page["answer_factor"] <= 1
        # the champion minus each deployable baseline, paired request by request (issue 16's test)
        for baseline, difference in entry["policy"]["versus"].items():
            mean = entry["policy"]["revenue"]["mean"] - entry["baselines"][baseline]["revenue"]["mean"]
            assert difference["revenue"]["mean"] == pytest.approx(mean, abs=1e-5)
        assert set(entry["policy"]["versus"]) == set(entry["baselines"])
        for name, baseline in entry["baselines"].items():  # each deployable auction against the others
            assert set(baseline["versus"]) == set(entry["baselines"]) - {name}
        greedy = entry["oracle_references"]["oracle_greedy"]["revenue"]["mean"]
        assert greedy >= entry["baselines"]["pre_generation"]["revenue"]["mean"]
    assert "simulation only" in report["sections"]["policy"] and "psi_t" in report["sections"]["baselines"]
    assert report["final_served"]["policy_version"] == last["policy_version"]  # the server followed the gate

    bootstrap, epoch, final = report["traffic"]
    assert (bootstrap["served"], bootstrap["failed"], bootstrap["policy_versions"]) == (100, 0, {"1": 100})
    assert (epoch["served"], epoch["failed"], epoch["policy_versions"]) == (50, 0, {"1": 50})  # no canary yet
    # The resumed phase sent only what the collector had not logged before the crash.
    assert (final["phase"], final["skipped"], final["served"], final["failed"]) == ("final canary", 20, 30, 0)
    assert arms["champion"]["requests"] + arms["challenger"]["requests"] == 50
    for version, n in final["policy_versions"].items():
        assert n <= arms["champion" if version == "1" else "challenger"]["requests"]
    assert bootstrap["clicks_acknowledged"] == bootstrap["clicks"] > 0
    # Engines started: pi_0's; none when psi_0 came (a new psi prices the same engine's samples); the
    # restarted server, with the challenger already in canary, starts the champion's and the
    # challenger's (its own engine: an adapter on the champion's would leak into the champion's arm).
    assert [p["server"]["engine_starts"] for p in (bootstrap, epoch, final)] == [1, 0, 2]

    store = EventStore(out / "collector")
    try:
        pairs = store.inference_pairs()
        predictions = [p for _, _, response in pairs for p in response["predictions"]]
    finally:
        store.close()
    assert len(predictions) == 200 and len({p["request_id"] for p in predictions}) == 200  # none twice
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
    # The server shares what psi encoded (every answer with an ad it priced, as it is logged): the
    # final canary's, priced after the last pipeline run and read by no step since, are in the
    # deployment's encoder cache, so a next pCTR training would not encode them again.
    cache = TextEncoder(cache_path=encoder_cache_path(settings))
    priced_answers = [p["response"] for p in predictions[150:] if p["allocation"]]
    cache.encode(priced_answers)
    assert priced_answers and cache.n_encoded == 0

    html = (out / "report.html").read_text()
    assert "pre_generation (deployable, ranked by psi_t)" in html
    assert "oracle_greedy (oracle reference, simulation only)" in html and "R (psi)" in html
    assert "each epoch&#x27;s candidate in canary" in html or "each epoch's candidate in canary" in html
    assert html.count("<img") == 3 and (out / "canary-epoch-1.png").is_file()

    # Where the time went: every phase, the pipeline's steps by name, nothing beyond the wall time.
    timings = report["timings"]
    phases = {r["phase"] for r in timings}
    assert {"bootstrap", "epoch 1", "final canary", "resume"} <= phases
    steps = {r["step"] for r in timings if r["phase"] == "epoch 1"}
    assert {"traffic", "pipeline: canary", "pipeline: train-dpo", "pipeline: evaluate"} <= steps
    assert all(r["seconds"] >= 0 for r in timings)
    assert sum(r["seconds"] for r in timings) <= report["wall_seconds"]
    assert "where the time went" in html
    # The console shows the loop's progress, not kfp.local's executor input, the steps' output or the
    # libraries' notices: those are in the run's log files.
    captured = capfd.readouterr()
    printed = captured.out + captured.err
    assert "Executing task" not in printed and "executorInput" not in printed
    assert "bootstrap: pi_0 serves" in printed  # the loop's own progress
    # MLflow's notices (its store's tables, a registration) are in the phase's log, not on the console.
    notice = "Creating initial MLflow database tables"
    assert notice not in printed and "Successfully registered model" not in printed
    assert notice in (out / "logs" / "pi0.log").read_text()
    assert "Executing task" in (out / "logs" / "pipeline-epoch-1.log").read_text()
