"""The irpo-epoch pipeline: the compiled YAML, its platform settings, the schedule."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from llm_auction.pipeline.local import StepClock, pipeline_function
from llm_auction.pipeline.steps.common import resolve_settings, resolve_window

REPO = Path(__file__).resolve().parents[1]
COMPILED = REPO / "pipelines" / "irpo_epoch.yaml"
STEPS = (
    "canary",
    "configure",
    "ingest",
    "train-pctr",
    "build-preferences",
    "train-dpo",
    "evaluate",
    "admit",
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
    # Every step's image and GPUs: vLLM sampling and evaluation on one GPU, DPO on a node's eight, in
    # the CUDA image (vLLM, DeepSpeed); the data and registry steps on CPUs in the CPU image.
    on_gpus = {"build-preferences": 1, "train-dpo": 8, "evaluate": 1}
    for step in STEPS:
        container = executors[f"exec-{step}"]["container"]
        accelerator = container.get("resources", {}).get("accelerator")
        if step in on_gpus:
            assert container["image"].startswith("ghcr.io/llm-auction/component-cuda:"), step
            assert accelerator["resourceType"] == "nvidia.com/gpu", step
            assert int(accelerator["resourceCount"]) == on_gpus[step], step
        else:
            assert container["image"].startswith("ghcr.io/llm-auction/component:"), step
            assert accelerator is None, step
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for step in STEPS:
        config = k8s[f"exec-{step}"]
        assert config["pvcMount"][0]["mountPath"] == "/mnt/llm-auction"
        secrets = {s["secretName"] for s in config["secretAsEnv"]}
        assert secrets == {"llm-auction-s3", "llm-auction-postgres"}
    for step in on_gpus:
        assert k8s[f"exec-{step}"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert k8s[f"exec-{step}"]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    assert "tolerations" not in k8s["exec-train-pctr"]
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
    assert set(conditions) == {"gate-passed", "gate-held", "canary-free"}
    assert conditions["gate-held"].startswith("!(") and "evaluate-Output" in conditions["gate-passed"]
    assert "admit-Output" in conditions["canary-free"]  # deploy only what the gate step admitted


def test_the_step_clock_times_each_task_from_kfp_locals_lines_and_passes_them_on():
    sink = io.StringIO()
    clock = StepClock(sink)
    task = "\x1b[96m'train-dpo'\x1b[0m"  # kfp.local colours the task's name
    clock.write(f"06:00:00.000 - INFO - Executing task {task}\n")
    clock.write("    {'loss': 0.69}\n")
    clock.write(f"06:00:02.000 - INFO - Task {task} finished with status \x1b[92mSUCCESS\x1b[0m\n")
    assert set(clock.seconds) == {"train-dpo"} and clock.seconds["train-dpo"] >= 0
    assert clock.status == {"train-dpo": "SUCCESS"}
    assert "{'loss': 0.69}" in sink.getvalue()  # everything still reaches the log


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


def _policy_isvc() -> dict:
    docs = yaml.safe_load_all((REPO / "deploy" / "base" / "inferenceservice.yaml").read_text())
    return next(d for d in docs if d and d.get("kind") == "InferenceService")


def _keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(_keys(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_keys(v) for v in node))
    return set()


ARTIFACTS = "s3://llm-auction-mlflow/artifacts/1/abc/artifacts/policy"


def test_the_challenger_inferenceservice_is_the_policy_predictor_alone():
    from llm_auction.deploy import validate_documents
    from llm_auction.serving.rollout import challenger_isvc

    policy = _policy_isvc()
    before = yaml.safe_dump(policy)
    challenger = challenger_isvc(policy, ARTIFACTS)
    assert yaml.safe_dump(policy) == before  # the base manifest is not touched
    problems = validate_documents([challenger])
    assert [p for p in problems if p.check in ("schema", "canary")] == [], problems
    assert problems == [], problems
    assert challenger["metadata"]["name"] == "policy-challenger"
    annotations = challenger["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] == "Standard"
    assert challenger["metadata"]["labels"]["llm-auction.io/arm"] == "challenger"
    assert challenger["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    assert list(challenger["spec"]) == ["predictor"]  # no transformer, no logger, no canary
    assert not {"canary", "canaryTrafficPercent", "transformer", "logger"} & _keys(challenger)
    model = challenger["spec"]["predictor"]["model"]
    assert model["storageUri"] == ARTIFACTS
    # It serves under the champion's name, the one the transformer's completions ask for.
    assert model["args"][-1] == "--model_name=policy" and "--backend=vllm" in model["args"]
    expected = {k: v for k, v in policy["spec"]["predictor"].items() if k != "model"}
    assert {k: v for k, v in challenger["spec"]["predictor"].items() if k != "model"} == expected
    with pytest.raises(ValueError, match="storage_uri"):
        challenger_isvc(policy, "")


def test_the_promotion_patch_keeps_the_policy_inferenceservice_valid():
    from llm_auction.config import deep_merge
    from llm_auction.deploy import validate_documents
    from llm_auction.serving.rollout import promotion_patch

    patched = deep_merge(_policy_isvc(), promotion_patch(ARTIFACTS))
    assert patched["spec"]["predictor"]["model"]["storageUri"] == ARTIFACTS
    assert "transformer" in patched["spec"] and not {"canary", "canaryTrafficPercent"} & _keys(patched)
    assert validate_documents([patched]) == []


def test_the_cluster_profile_reaches_the_challenger_predictor_service():
    from llm_auction.config import load_config
    from llm_auction.serving.rollout import CHALLENGER

    settings = load_config(profile="cluster", environ={})
    host = f"{CHALLENGER}-predictor.{settings.irpo.distributed.namespace}.svc.cluster.local"
    assert settings.serving.challenger_predictor_url == f"http://{host}"


@pytest.fixture()
def local_serving(tmp_path, monkeypatch):
    """Local settings on tmp_path with a stand-in registry: version 2 is challenger, 1 champion."""
    from llm_auction.config import load_config
    from llm_auction.serving import rollout

    aliases = {"champion": "1", "challenger": "2"}
    monkeypatch.setattr(rollout.registry, "alias_version", lambda cfg, name, alias: aliases.get(alias))
    monkeypatch.setattr(rollout.registry, "version_source", lambda cfg, name, v: f"/models/v{v}")
    settings = load_config(profile="local", environ={}, overrides={"data_dir": str(tmp_path)})
    return settings, aliases


def test_local_canary_records_round_trip(local_serving):
    from llm_auction.serving.rollout import end_canary, start_canary

    settings, aliases = local_serving
    serving = settings.data_dir / "serving"
    assert start_canary(settings, "3") == {"started": False, "challenger": "2", "version": "3"}
    assert not serving.exists()

    started = start_canary(settings, "2")
    canary = json.loads((serving / "canary.json").read_text())
    assert canary == {k: v for k, v in started.items() if k != "record"}
    assert canary["challenger"] == "2" and canary["source"] == "/models/v2"
    assert canary["canary_percent"] == settings.serving.canary_percent and canary["started_at"]

    ended = end_canary(settings, "2", "rollback")
    assert not (serving / "canary.json").exists() and not (serving / "champion.json").exists()
    (line,) = (serving / "canary-history.jsonl").read_text().splitlines()
    assert json.loads(line) == {k: v for k, v in ended.items() if k != "history"}
    assert ended["decision"] == "rollback" and ended["started_at"] == canary["started_at"]

    start_canary(settings, "2")
    aliases.update(champion="2", challenger=None)  # the registry promoted it before serving follows
    promoted = end_canary(settings, "2", "promote")
    assert promoted["promotion"]["rolled"] is True and promoted["promotion"]["source"] == "/models/v2"
    assert json.loads((serving / "champion.json").read_text())["champion"] == "2"
    decisions = [
        json.loads(x)["decision"] for x in (serving / "canary-history.jsonl").read_text().splitlines()
    ]
    assert decisions == ["rollback", "promote"]


def test_an_unknown_canary_decision_is_named(local_serving):
    from llm_auction.serving.rollout import end_canary, start_canary

    settings, _ = local_serving
    start_canary(settings, "2")
    with pytest.raises(ValueError, match="'keep going'"):
        end_canary(settings, "2", "keep going")
    assert (settings.data_dir / "serving" / "canary.json").is_file()  # nothing was ended


class FakeCustomObjects:
    """The CustomObjectsApi calls the rollout makes, on a dict of InferenceServices."""

    def __init__(self, objects: dict[str, dict]):
        self.objects, self.calls = objects, []

    def _missing(self, name: str):
        from kubernetes.client import ApiException

        if name not in self.objects:
            raise ApiException(status=404, reason=f"{name} not found")

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self._missing(name)
        return self.objects[name]

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        from kubernetes.client import ApiException

        self.calls.append(("create", body["metadata"]["name"]))
        if body["metadata"]["name"] in self.objects:
            raise ApiException(status=409, reason="AlreadyExists")
        self.objects[body["metadata"]["name"]] = {
            **body,
            "metadata": {**body["metadata"], "resourceVersion": "1"},
        }

    def replace_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self._missing(name)
        assert body["metadata"]["resourceVersion"] == self.objects[name]["metadata"]["resourceVersion"]
        self.calls.append(("replace", name))
        self.objects[name] = body

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("delete", name))
        self._missing(name)
        del self.objects[name]

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        from llm_auction.config import deep_merge

        self._missing(name)
        self.calls.append(("patch", name))
        self.objects[name] = deep_merge(self.objects[name], body)


def test_cluster_canary_creates_replaces_deletes_and_promotes(local_serving, monkeypatch):
    from llm_auction.serving import rollout

    settings, aliases = local_serving
    settings = settings.model_copy(update={"profile": "cluster"})
    api = FakeCustomObjects({"policy": {**_policy_isvc(), "metadata": {"name": "policy", "namespace": "x"}}})
    monkeypatch.setattr(rollout, "_api", lambda: api)

    assert rollout.start_canary(settings, "2")["action"] == "created"
    assert rollout.start_canary(settings, "2")["action"] == "replaced"  # one a crashed run left
    assert api.objects["policy-challenger"]["spec"]["predictor"]["model"]["storageUri"] == "/models/v2"
    assert rollout.end_canary(settings, "2", "rollback")["deleted"] is True
    assert rollout.end_canary(settings, "2", "inconclusive")["deleted"] is False  # 404: already gone
    rollout.start_canary(settings, "2")
    aliases.update(champion="2", challenger=None)
    promoted = rollout.end_canary(settings, "2", "promote")
    assert promoted["deleted"] is True and promoted["promotion"]["inferenceservice"] == "policy"
    assert api.objects["policy"]["spec"]["predictor"]["model"]["storageUri"] == "/models/v2"
    assert set(api.objects) == {"policy"}
    assert [c for c in api.calls if c[0] in ("patch", "delete")][-2:] == [
        ("patch", "policy"),
        ("delete", "policy-challenger"),
    ]


def test_a_corrupted_feedback_file_is_named_in_the_error(tmp_path):
    from llm_auction.public.feedback import FeedbackFileError, read_feedback

    (tmp_path / "impressions").mkdir()
    (tmp_path / "impressions" / "bad.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(FeedbackFileError, match=r"feedback file .*bad\.parquet: not readable as parquet"):
        read_feedback(tmp_path)
