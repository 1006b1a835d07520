"""One complete IRPO epoch through kfp.local, then a run that fails on corrupted feedback.

The pipeline sees only the public side: the platform's files (catalog, profiles, request files),
the collector's logs (exported to the feedback store) and the feature store. Every step's process
runs with `llm_auction.simulator` and `llm_auction.world` made unimportable, and no world folder
exists: a step that reached for the hidden truth would fail the run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import TINY_EPOCH, register_champion
from llm_auction.config import load_config
from llm_auction.pipeline.local import run_local
from llm_auction.policy.allocator import LLMPolicy
from llm_auction.policy.generation import make_generator
from llm_auction.serving.auction import prediction
from llm_auction.serving.collector import Click, EventStore
from llm_auction.serving.export import export_feedback
from llm_auction.simulator.experiment import evaluate_policy, export_public, user_profiles
from llm_auction.tracking import registry

pytestmark = pytest.mark.slow

BLOCK_ORACLE = """
import importlib.abc, sys

class _OracleSide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[:2] in (["llm_auction", "simulator"], ["llm_auction", "world"]):
            raise ImportError(f"{name}: the oracle side is not available to the pipeline")
        return None

sys.meta_path.insert(0, _OracleSide())
"""


@pytest.fixture(scope="module")
def oracle_blocked(tmp_path_factory):
    """Each kfp.local step starts with a sitecustomize that refuses the simulator and the world."""
    folder = tmp_path_factory.mktemp("block-oracle")
    (folder / "sitecustomize.py").write_text(BLOCK_ORACLE)
    before = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(folder), before) if p)
    yield folder
    if before is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = before


def test_the_block_really_refuses_the_oracle_side(oracle_blocked):
    import subprocess

    probe = (
        "import llm_auction.pipeline.steps.evaluate\n"
        "try:\n    import llm_auction.simulator\nexcept ImportError as e:\n    print(e)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "the oracle side is not available" in out.stdout


def collector_feedback(policy_env, settings, policy_dir, root: Path):
    """pi_0 serves 700 requests to simulated users; what the collector stores is exported as feedback."""
    batch = policy_env.world.auction_requests(limit=700)
    policy = LLMPolicy(
        make_generator(settings.policy.generation, policy_dir), user_profiles(policy_env.world)
    )
    result, _ = evaluate_policy(policy_env, policy, batch, seed=1)
    served_at = policy_env.world.requests.set_index("request_id")["timestamp"]
    responses = result.requests.set_index("request_id")["response"]
    clicked = result.impressions[result.impressions["clicked"]]
    store = EventStore(root / "collector")
    for request in batch:
        ce_id = f"ce-{request.request_id}"
        response_id = f"1:{request.request_id}"
        answer = prediction(
            request,
            responses[request.request_id],
            response_id=response_id,
            policy_version="1",
            served_at=served_at[request.request_id].to_pydatetime(),
            max_ads=settings.mechanism.max_ads,
            pctr=None,
        )
        store.add_inference(ce_id, "request", "org.kubeflow.serving.inference.request", "test", {
            "instances": [request.model_dump()]
        })  # fmt: skip
        store.add_inference(ce_id, "response", "org.kubeflow.serving.inference.response", "test", {
            "predictions": [answer]
        })  # fmt: skip
    store.add_clicks(
        [
            Click(
                event_id=f"clk:{row.request_id}:{row.ad_id}",
                request_id=row.request_id,
                response_id=f"1:{row.request_id}",
                ad_id=row.ad_id,
                event_timestamp=served_at[row.request_id].to_pydatetime() + np.timedelta64(5, "s"),
            )
            for row in clicked.itertuples(index=False)
        ]
    )
    export_feedback(store, root / "feedback", "collector")
    store.close()
    return (str(served_at[batch[0].request_id].floor("D")), str(served_at[batch[-1].request_id].ceil("h")))


@pytest.fixture(scope="module")
def workspace(pi0, policy_env, oracle_blocked, tmp_path_factory):
    """A config on temporary stores, the world's public files, pi_0 as champion, its traffic as feedback."""
    root = tmp_path_factory.mktemp("epoch")
    config = {
        **TINY_EPOCH,
        "data_dir": str(root / "data"),
        "features": {"data_dir": str(root / "data" / "features"), "quarantine_dir": str(root / "quarantine")},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts")},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    settings = load_config(root / "config.yaml", environ={})
    export_public(policy_env, settings.public_dir)
    register_champion(settings, pi0[0])
    window = collector_feedback(policy_env, settings, pi0[0], root)
    return root, settings, window


def _run(root: Path, window: tuple[str, str], pipeline_root: Path, feedback: Path) -> None:
    run_local(
        pipeline_root,
        epoch=1,
        window_start=window[0],
        window_end=window[1],
        feedback_dir=str(feedback),
        policy_uri="models:/llm-auction-policy@champion",
        profile="local",
        config_path=str(root / "config.yaml"),
        overrides="",
    )


def test_one_epoch_through_kfp_local(workspace):
    from mlflow.tracking import MlflowClient

    root, settings, window = workspace
    _run(root, window, root / "pipeline", root / "feedback")

    (run_dir,) = (root / "pipeline").iterdir()
    pairs = next(run_dir.glob("build-preferences/pairs"))
    assert (pairs / "pairs.parquet").is_file() and json.loads((pairs / "pairs_stats.json").read_text())[
        "pairs"
    ] > 0
    assert (next(run_dir.glob("train-pctr/pctr")) / "pctr_config.json").is_file()
    assert (next(run_dir.glob("train-dpo/policy")) / "adapter" / "adapter_model.safetensors").is_file()
    stats = json.loads((pairs / "pairs_stats.json").read_text())
    assert stats["prompts_online"] > 0  # the prompts are the requests the collector logged
    evaluation = json.loads((next(run_dir.glob("evaluate/evaluation")) / "evaluation.json").read_text())
    assert "<html" in next(run_dir.glob("evaluate/report")).read_text().lower()
    assert set(evaluation["policies"]) == {"candidate", "champion", "pre_generation", "post_generation"}
    assert "psi_t" in evaluation["section"] and evaluation["monotonicity"]["click_model"] == "psi_t"
    responses = next(run_dir.glob("evaluate/evaluation")) / "responses.parquet"
    assert responses.is_file()  # the samples the oracle can score afterwards, outside the pipeline

    client = MlflowClient(tracking_uri=settings.tracking.uri)
    experiment = client.get_experiment_by_name(settings.tracking.experiment)
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "irpo-epoch-1"]
    assert parent.info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == {"ingest", "train-pctr", "irpo-pairs", "irpo-dpo", "evaluate"}
    name = settings.irpo.registered_model
    candidate = client.get_model_version(name, "2")
    assert candidate.tags["lineage.epoch"] == "1" and candidate.tags["lineage.pctr_version"] == "1"
    admitted = evaluation["gate"]["admitted"] and all(c["passed"] for c in evaluation["gate"]["checks"])
    assert candidate.tags["gate.admitted"] == str(admitted).lower()
    # No challenger served this window: the canary step found nothing to decide, and only live
    # traffic promotes, so pi_0 stays champion whatever the offline gate said.
    verdict = json.loads((next(run_dir.glob("canary/result")) / "canary.json").read_text())
    assert (verdict["champion"], verdict["challenger"], verdict["decision"]) == ("1", None, "none")
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == "1"
    challenger = registry.alias_version(settings.tracking, name, registry.CHALLENGER)
    assert challenger == ("2" if admitted else None)
    assert (settings.data_dir / "serving" / "canary.json").is_file() == admitted  # the canary started


def test_a_corrupted_feedback_file_fails_the_run_and_leaves_the_champion(workspace, tmp_path):
    from mlflow.tracking import MlflowClient

    root, settings, window = workspace
    name = settings.irpo.registered_model
    before = registry.alias_version(settings.tracking, name, registry.CHAMPION)
    broken = tmp_path / "feedback"
    (broken / "impressions").mkdir(parents=True)
    (broken / "clicks").mkdir()
    (broken / "impressions" / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(RuntimeError, match="ingest"):
        _run(root, window, tmp_path / "pipeline", broken)
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == before
    client = MlflowClient(tracking_uri=settings.tracking.uri)
    experiment = client.get_experiment_by_name(settings.tracking.experiment)
    failed = [r for r in client.search_runs([experiment.experiment_id]) if r.info.status == "FAILED"]
    (epoch_run,) = [r for r in failed if r.info.run_name == "irpo-epoch-1"]
    error = epoch_run.data.tags["llm_auction.error"]
    assert error.startswith("FeedbackFileError: feedback file") and "bad.parquet" in error
