"""One complete IRPO epoch through kfp.local, then a run that fails on corrupted feedback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from helpers import TINY_EPOCH, register_champion
from llm_auction.config import load_config
from llm_auction.pipeline.local import run_local
from llm_auction.simulator.experiment import evaluate_policy
from llm_auction.public.feedback import request_rows, write_feedback
from llm_auction.simulator.feedback import feedback_logs
from llm_auction.tracking import registry

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(pi0, policy_env, tmp_path_factory):
    """A config on temporary stores, pi_0 registered as champion, and pi_0's traffic as feedback."""
    root = tmp_path_factory.mktemp("epoch")
    config = {
        **TINY_EPOCH,
        "data_dir": str(root / "data"),
        "features": {"data_dir": str(root / "data" / "features"), "quarantine_dir": str(root / "quarantine")},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts")},
    }
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    settings = load_config(root / "config.yaml", environ={})
    register_champion(settings, pi0[0])
    from llm_auction.policy.allocator import LLMPolicy
    from llm_auction.policy.generation import make_generator
    from llm_auction.simulator.experiment import user_profiles

    batch = policy_env.world.auction_requests(limit=700)
    policy = LLMPolicy(
        make_generator(settings.policy.generation, pi0[0]), user_profiles(policy_env.world), "pi_0"
    )
    result, _ = evaluate_policy(policy_env, policy, batch, seed=1)
    timestamps = policy_env.world.requests.set_index("request_id")["timestamp"]
    impressions, clicks = feedback_logs(result, batch, timestamps, "1", np.random.default_rng(2))
    write_feedback(root / "feedback", "pi0", impressions, clicks)
    window = (
        str(timestamps[batch[0].request_id].floor("D")),
        str(timestamps[batch[-1].request_id].ceil("h")),
    )
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
    evaluation = json.loads((next(run_dir.glob("evaluate/evaluation")) / "evaluation.json").read_text())
    assert "<html" in next(run_dir.glob("evaluate/report")).read_text().lower()

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
    assert candidate.tags["gate.promote"] == str(evaluation["gate"]["promoted"]).lower()
    champion = registry.alias_version(settings.tracking, name, registry.CHAMPION)
    assert champion == ("2" if evaluation["gate"]["promoted"] else "1")
    pointer = settings.data_dir / "serving" / "champion.json"
    assert pointer.is_file() == evaluation["gate"]["promoted"]


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
