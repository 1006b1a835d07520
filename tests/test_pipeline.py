"""The irpo-epoch pipeline: the compiled YAML, its platform settings, the schedule."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llm_auction.pipeline.local import pipeline_function
from llm_auction.pipeline.steps import resolve_settings, resolve_window

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "irpo_epoch.yaml"
STEPS = (
    "configure",
    "ingest",
    "train-pctr",
    "build-preferences",
    "train-dpo",
    "evaluate",
    "promote",
    "deploy",
)


def _compile(path: Path) -> Path:
    from kfp import compiler

    compiler.Compiler().compile(pipeline_function(), str(path))
    return path


def test_the_committed_yaml_is_current(tmp_path):
    fresh = _compile(tmp_path / "irpo_epoch.yaml").read_text()
    assert fresh == COMPILED.read_text(), "pipelines/irpo_epoch.yaml is stale: run `make compile`"


def test_the_compiled_yaml_loads_back_with_its_platform_settings():
    from kfp import components

    loaded = components.load_component_from_file(str(COMPILED))
    assert loaded.name == "irpo-epoch"
    spec, platform = list(yaml.safe_load_all(COMPILED.read_text()))
    executors = spec["deploymentSpec"]["executors"]
    for step in STEPS:
        assert f"exec-{step}" in executors, step
    dpo = executors["exec-train-dpo"]["container"]
    assert dpo["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert int(dpo["resources"]["accelerator"]["resourceCount"]) == 8
    assert dpo["image"].startswith("ghcr.io/llm-auction/component:")
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in STEPS:
        config = k8s[f"exec-{step}"]
        assert config["pvcMount"][0]["mountPath"] == "/mnt/llm-auction"
        secrets = {s["secretName"] for s in config["secretAsEnv"]}
        assert secrets == {"llm-auction-s3", "llm-auction-postgres"}
    assert k8s["exec-train-dpo"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert k8s["exec-train-dpo"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert "tolerations" not in k8s["exec-evaluate"]
    # Fresh feedback every run: no step may be served from the cache.
    tasks = spec["root"]["dag"]["tasks"]
    assert all(not t.get("cachingOptions", {}).get("enableCache", False) for t in tasks.values())


def test_the_gate_is_a_condition_with_both_branches():
    spec = next(yaml.safe_load_all(COMPILED.read_text()))
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    conditions = {
        t["taskInfo"]["name"]: t["triggerPolicy"]["condition"]
        for dag in dags
        for t in dag["tasks"].values()
        if "triggerPolicy" in t
    }
    assert set(conditions) == {"gate-passed", "gate-held"}
    assert conditions["gate-held"].startswith("!(") and "evaluate-Output" in conditions["gate-passed"]


def test_settings_are_validated_once_with_the_failing_key_named():
    settings = resolve_settings("local", "", "irpo:\n  m_samples: 2\n")
    assert '"m_samples":2' in settings
    with pytest.raises(ValueError, match="irpo.m_sample: unknown key"):
        resolve_settings("local", "", "irpo:\n  m_sample: 2\n")


def test_a_scheduled_run_ingests_the_period_before_its_time():
    assert resolve_window("", "2026-03-01T06:00:00Z", 6) == (
        "2026-03-01T00:00:00+00:00",
        "2026-03-01T06:00:00+00:00",
    )


class FakeKFP:
    """Stands in for the KFP API server (none can run here): records what the schedule asks of it."""

    def __init__(self, existing: list[str]) -> None:
        self.jobs = [
            SimpleNamespace(display_name=n, recurring_run_id=f"id-{n}-{i}") for i, n in enumerate(existing)
        ]
        self.deleted: list[str] = []
        self.created: dict = {}

    def create_experiment(self, name):
        return SimpleNamespace(experiment_id=f"exp-{name}")

    def list_recurring_runs(self, experiment_id, page_size):
        return SimpleNamespace(recurring_runs=self.jobs)

    def delete_recurring_run(self, recurring_run_id):
        self.deleted.append(recurring_run_id)

    def create_recurring_run(self, **kwargs):
        self.created = kwargs
        return SimpleNamespace(recurring_run_id="new-id")


def test_schedule_replaces_an_existing_recurring_run_and_never_overlaps():
    from pipelines.schedule import create_or_update

    client = FakeKFP(["irpo-epoch", "something-else"])
    assert create_or_update(client, cron="0 0 */6 * * *") == "new-id"
    assert client.deleted == ["id-irpo-epoch-0"]
    created = client.created
    assert created["cron_expression"] == "0 0 */6 * * *"
    assert created["max_concurrency"] == 1 and created["no_catchup"] is True
    assert created["params"]["window_end"] == "[[ScheduledTime]]"
    assert Path(created["pipeline_package_path"]) == COMPILED


def test_the_canary_patch_keeps_the_inferenceservice_valid():
    from llm_auction.deploy import validate_documents
    from llm_auction.deploy.policies import deep_merge
    from llm_auction.serving.rollout import canary_patch

    docs = list(yaml.safe_load_all((REPO / "deploy" / "base" / "inferenceservice.yaml").read_text()))
    isvc = next(d for d in docs if d and d.get("kind") == "InferenceService")
    patched = deep_merge(isvc, canary_patch("s3://llm-auction-mlflow/artifacts/1/abc/artifacts/policy", 10))
    assert patched["spec"]["predictor"]["canaryTrafficPercent"] == 10
    assert [p for p in validate_documents([patched]) if p.check == "schema"] == []
    with pytest.raises(ValueError, match="canary_percent"):
        canary_patch("s3://x", 120)


def test_a_corrupted_feedback_file_is_named_in_the_error(tmp_path):
    from llm_auction.public.feedback import FeedbackFileError, read_feedback

    (tmp_path / "impressions").mkdir()
    (tmp_path / "impressions" / "bad.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(FeedbackFileError, match=r"feedback file .*bad\.parquet: not readable as parquet"):
        read_feedback(tmp_path)
