"""An irpo-epoch run through kfp.local that fails on corrupted feedback, and the block that keeps
the oracle side out of the pipeline's steps.

The complete epoch through kfp.local, with that block on, runs in `tests/test_loop.py` (the closed
loop): every step's process starts with `llm_auction.simulator` and `llm_auction.world` made
unimportable, so a step that reached for the hidden truth would fail the run.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from helpers import TINY_EPOCH, oracle_blocked, register_champion
from llm_auction.config import load_config
from llm_auction.pipeline.local import run_local
from llm_auction.simulator.experiment import export_public
from llm_auction.tracking import registry

pytestmark = pytest.mark.slow

WINDOW = ("2026-01-01", "2026-01-02")


def test_the_block_really_refuses_the_oracle_side(tmp_path):
    probe = (
        "import llm_auction.pipeline.steps.evaluate\n"
        "try:\n    import llm_auction.simulator\nexcept ImportError as e:\n    print(e)"
    )
    with oracle_blocked(tmp_path):
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "the oracle side is not available" in out.stdout


@pytest.fixture
def workspace(pi0, policy_env, tmp_path):
    """A config on temporary stores, the world's public files, pi_0 as champion."""
    root = tmp_path / "epoch"
    config = {
        **TINY_EPOCH,
        "data_dir": str(root / "data"),
        "features": {"data_dir": str(root / "data" / "features"), "quarantine_dir": str(root / "quarantine")},
        "tracking": {"uri": f"sqlite:///{root}/mlflow.db", "artifact_location": str(root / "artifacts")},
    }
    root.mkdir()
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    settings = load_config(root / "config.yaml", environ={})
    export_public(policy_env, settings.public_dir)
    register_champion(settings, pi0[0])
    return root, settings


def test_a_corrupted_feedback_file_fails_the_run_and_leaves_the_champion(workspace, tmp_path):
    from mlflow.tracking import MlflowClient

    root, settings = workspace
    name = settings.irpo.registered_model
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == "1"
    broken = tmp_path / "feedback"
    (broken / "impressions").mkdir(parents=True)
    (broken / "clicks").mkdir()
    (broken / "impressions" / "bad.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(RuntimeError, match="ingest"):
        with oracle_blocked(tmp_path):
            run_local(
                tmp_path / "pipeline",
                epoch=1,
                window_start=WINDOW[0],
                window_end=WINDOW[1],
                feedback_dir=str(broken),
                policy_uri=f"models:/{name}@champion",
                profile="local",
                config_path=str(root / "config.yaml"),
                overrides="",
            )
    assert registry.alias_version(settings.tracking, name, registry.CHAMPION) == "1"
    client = MlflowClient(tracking_uri=settings.tracking.uri)
    experiment = client.get_experiment_by_name(settings.tracking.experiment)
    failed = [r for r in client.search_runs([experiment.experiment_id]) if r.info.status == "FAILED"]
    (epoch_run,) = [r for r in failed if r.info.run_name == "irpo-epoch-1"]
    error = epoch_run.data.tags["llm_auction.error"]
    assert error.startswith("FeedbackFileError: feedback file") and "bad.parquet" in error
