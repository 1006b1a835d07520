"""The registry through a real `mlflow server` on 127.0.0.1: what a reviewer's plain client sees."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from helpers import mlflow_server_command
from llm_auction.config import TrackingConfig
from llm_auction.errors import RegistryError
from llm_auction.simulator.services import free_port
from llm_auction.tracking import registry
from llm_auction.tracking.runs import tracked_run

pytestmark = pytest.mark.slow
NAME = "llm-auction-policy"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = mlflow_server_command(root, port)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"mlflow server did not start: {process.stderr.read()[-2000:]}")
        time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(timeout=20)


def _version(cfg: TrackingConfig, tmp_path: Path, epoch: int) -> str:
    model_dir = tmp_path / f"pi_{epoch}"
    model_dir.mkdir()
    (model_dir / "policy_card.json").write_text(json.dumps({"epoch": epoch}))
    with tracked_run(cfg, f"dpo-{epoch}") as run:
        run.log_artifacts(model_dir, "policy")
        return registry.register_version(cfg, NAME, run.run_id, "policy", tags={"lineage.epoch": epoch})


def _rest(url: str, path: str) -> dict:
    with urllib.request.urlopen(f"{url}/api/2.0/mlflow/{path}", timeout=10) as response:
        return json.loads(response.read())


def test_plain_clients_read_versions_aliases_tags_and_the_review_card(server, tmp_path):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(uri=server, experiment="registry-test")
    v1, v2, v3 = (_version(cfg, tmp_path, epoch) for epoch in range(3))
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(cfg, NAME, "alice", "nothing to roll back to yet")
    registry.promote(cfg, NAME, v1, "bootstrap", "pi_0")
    card = "## llm-auction-policy v2\n\n| check | value | bound | result |\n|---|---|---|---|\n"
    card += "| kl | 1.2 | <= 5 | pass |\n"
    registry.annotate_version(cfg, NAME, v2, {"gate.admitted": "true", "metric.revenue": 0.37}, card)
    assert registry.promote(cfg, NAME, v2, "irpo-pipeline", "every check passed") == v1
    registry.set_alias(cfg, NAME, registry.CHALLENGER, v3)
    registry.approve(cfg, NAME, v3, "bob")

    client = MlflowClient(tracking_uri=server)  # a reviewer's plain client, over REST
    assert client.get_model_version_by_alias(NAME, "champion").version == v2
    assert client.get_model_version_by_alias(NAME, "challenger").version == v3
    version = client.get_model_version(NAME, v2)
    assert version.description == card
    assert version.tags["previous_champion"] == v1 and version.tags["promoted_by"] == "irpo-pipeline"
    assert client.get_model_version(NAME, v3).tags["approved"] == "true"
    raw = _rest(server, f"registered-models/alias?name={NAME}&alias=champion")
    assert raw["model_version"]["version"] == v2

    current, restored = registry.rollback(cfg, NAME, "alice", "revenue dropped in the canary")
    assert (current, restored) == (v2, v1)
    assert client.get_model_version_by_alias(NAME, "champion").version == v1
    rolled = client.get_model_version(NAME, v2).tags
    assert (
        rolled["rolled_back_by"] == "alice"
        and rolled["rolled_back_reason"] == "revenue dropped in the canary"
    )
    assert client.get_model_version(NAME, v1).tags["restored_by"] == "alice"
    info = registry.show(cfg, NAME)
    assert [v["version"] for v in info["versions"]] == [v3, v2, v1]
    assert info["champion_history"] == v1
    with pytest.raises(RegistryError, match="no version"):
        registry.promote(cfg, NAME, "99", "x", "y")
