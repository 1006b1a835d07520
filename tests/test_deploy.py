"""The cluster profile's manifests and images, validated offline.

Every overlay is rendered with `kubectl kustomize` and checked against the real CRDs of the add-ons and the
project's policies; each negative test mutates one valid rendered object in memory and expects the problem
to be named. kubectl missing is a failure, never a skip: without it nothing here would be checked.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from llm_auction.deploy import (
    KubectlNotFoundError,
    Problem,
    overlay_names,
    render_overlay,
    split_documents,
    validate_documents,
)
from llm_auction.deploy import validate as validate_module
from llm_auction.deploy.dockerfiles import check_dockerfile

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = ("dev", "prod")
NAMESPACE = "llm-auction"
COLLECTOR_URL = "http://feedback-collector.llm-auction.svc.cluster.local/v1/events"

Manifest = dict[str, Any]


@pytest.fixture(scope="session")
def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail(
            "kubectl not found on PATH: the deploy tests render deploy/overlays with `kubectl kustomize` "
            "(kubectl >= 1.27, kustomize v5). Install kubectl; these tests never skip."
        )
    return path


@pytest.fixture(scope="session")
def rendered(kubectl: str) -> dict[str, list[Manifest]]:
    return {name: split_documents(render_overlay(name)) for name in OVERLAYS}


@pytest.fixture()
def prod(rendered: dict[str, list[Manifest]]) -> list[Manifest]:
    return copy.deepcopy(rendered["prod"])


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def problems_of(doc: Manifest) -> list[str]:
    return [str(p) for p in validate_documents([doc])]


def assert_rejected(doc: Manifest, *needles: str) -> None:
    problems = problems_of(doc)
    assert any(all(n in p for n in needles) for p in problems), f"no problem naming {needles}; got {problems}"


def test_every_overlay_is_tested() -> None:
    assert tuple(overlay_names()) == OVERLAYS


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_passes_validation(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    problems = validate_documents(rendered[overlay])
    assert problems == [], "\n".join(map(str, problems))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_keeps_the_names_the_system_uses(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    docs = rendered[overlay]
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{doc['kind']}/{doc['metadata']['name']}"
    ports = {
        d["metadata"]["name"]: [(p["port"], p["targetPort"]) for p in d["spec"]["ports"]]
        for d in docs
        if d["kind"] == "Service"
    }
    assert ports == {
        "feedback-collector": [(80, "http")],
        "mlflow": [(5000, "http")],
        "feast-feature-server": [(6566, "http")],
        "redis": [(6379, "redis")],
    }
    collector = find(docs, "Deployment", "feedback-collector")["spec"]["template"]["spec"]["containers"][0]
    assert collector["ports"] == [{"name": "http", "containerPort": 8080}]
    assert {"name": "feedback", "mountPath": "/var/lib/llm-auction/feedback"} in collector["volumeMounts"]
    isvc = find(docs, "InferenceService", "policy")
    assert isvc["spec"]["predictor"]["model"]["runtime"] == "kserve-huggingfaceserver"
    assert "--backend=vllm" in isvc["spec"]["predictor"]["model"]["args"]
    assert isvc["spec"]["transformer"]["logger"]["url"] == COLLECTOR_URL
    transformer = isvc["spec"]["transformer"]["containers"][0]
    assert transformer["args"][:2] == ["serve", "--transformer"] and "--host=0.0.0.0" in transformer["args"]
    mlflow_args = find(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert any(arg.startswith("--allowed-hosts=") for arg in mlflow_args)
    assert find(docs, "TrainJob", "irpo-dpo-template")["spec"]["runtimeRef"]["name"] == "torch-distributed"


def _keys(node: Any) -> set[str]:
    if isinstance(node, dict):
        return set(node).union(*(_keys(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(_keys(value) for value in node))
    return set()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_overlay_declares_a_kserve_canary(rendered: dict[str, list[Manifest]], overlay: str) -> None:
    """The canary is a second InferenceService the pipeline creates, split by user in the transformer:
    KServe's canaries split per request, so a user would see both arms."""
    docs = rendered[overlay]
    isvc = find(docs, "InferenceService", "policy")
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    for doc in docs:
        assert not {"canary", "canaryTrafficPercent"} & _keys(doc), f"{doc['kind']}/{doc['metadata']['name']}"
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "InferenceService"] == ["policy"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_transformer_may_load_for_minutes_before_liveness_counts(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    """`llm-auction serve` binds its port once psi and the tokenizer are loaded: without a startup
    probe, three failed liveness checks would restart a cold pod that is still loading. The bound
    is not a measurement of the cluster: the local loop starts collector and server in 24-26 s
    (its "services start" row, engine included), and a cold pod also fetches from the object store."""
    (container,) = find(rendered[overlay], "InferenceService", "policy")["spec"]["transformer"]["containers"]
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    assert startup["httpGet"] == liveness["httpGet"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pipeline_may_roll_the_policy_and_its_challenger_only(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    rules = find(rendered[overlay], "Role", "llm-auction-pipeline")["rules"]
    isvc_rules = [r for r in rules if "inferenceservices" in r["resources"]]
    assert all(
        r["apiGroups"] == ["serving.kserve.io"] and r["resources"] == ["inferenceservices"]
        for r in isvc_rules
    )
    verbs = {tuple(r.get("resourceNames", ())): sorted(r["verbs"]) for r in isvc_rules}
    assert verbs == {
        ("policy",): ["get", "patch"],
        ("policy-challenger",): ["delete", "get", "update"],
        (): ["create"],  # resourceNames cannot restrict create
    }
    assert len(isvc_rules) == len(verbs)


def _admits(policy: Manifest, labels: dict[str, str], port: int) -> bool:
    """Whether a NetworkPolicy lets a pod of this namespace with `labels` in on `port`."""
    for rule in policy["spec"].get("ingress", []):
        ports = [p["port"] for p in rule.get("ports", [])]
        peers = [p["podSelector"]["matchLabels"] for p in rule.get("from", []) if set(p) == {"podSelector"}]
        if (not ports or port in ports) and any(peer.items() <= labels.items() for peer in peers):
            return True
    return False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_transformer_reaches_both_predictors_and_nothing_else_reaches_the_challenger(
    rendered: dict[str, list[Manifest]], overlay: str
) -> None:
    from llm_auction.serving.rollout import challenger_isvc

    docs = rendered[overlay]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    transformer = {"serving.kserve.io/inferenceservice": "policy", "component": "transformer"}
    challenger_predictor = {
        "serving.kserve.io/inferenceservice": "policy-challenger",
        "component": "predictor",
    }
    guarding = [
        p
        for p in policies
        if p["spec"]["podSelector"].get("matchLabels", {}).items() <= challenger_predictor.items()
    ]
    assert [p["metadata"]["name"] for p in guarding] == ["default-deny-ingress", "policy-challenger"]
    assert any(_admits(p, transformer, 8080) for p in guarding)
    assert not any(_admits(p, {"app.kubernetes.io/name": "feedback-collector"}, 8080) for p in guarding)
    assert _admits(find(docs, "NetworkPolicy", "policy-endpoint"), transformer, 8080)
    # The challenger built from this overlay's `policy` (what the pipeline reads from the cluster) is valid.
    challenger = challenger_isvc(find(docs, "InferenceService", "policy"), "s3://llm-auction-mlflow/a/policy")
    assert challenger["metadata"]["namespace"] == NAMESPACE
    assert validate_documents([challenger]) == []


def images_in(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["image"]} if isinstance(node.get("image"), str) else set()
        return found.union(*(images_in(value) for value in node.values()))
    if isinstance(node, list):
        return set().union(*(images_in(value) for value in node))
    return set()


def test_project_images_carry_the_package_version(rendered: dict[str, list[Manifest]]) -> None:
    tag = version("llm-auction")
    ours = {i for docs in rendered.values() for i in images_in(docs) if i.startswith("ghcr.io/llm-auction/")}
    assert ours == {
        f"ghcr.io/llm-auction/{name}:{tag}" for name in ("component", "component-cuda", "serving")
    }


def test_rejects_trainjob_field_from_another_release(prod: list[Manifest]) -> None:
    trainjob = find(prod, "TrainJob", "irpo-dpo-template")
    trainjob["spec"]["podSpecOverrides"] = [{"targetJobs": [{"name": "node"}], "serviceAccountName": "x"}]
    assert_rejected(trainjob, "TrainJob/irpo-dpo-template", "[schema]", "'podSpecOverrides' was unexpected")


def test_rejects_misspelt_inferenceservice_field(prod: list[Manifest]) -> None:
    isvc = find(prod, "InferenceService", "policy")
    model = isvc["spec"]["predictor"]["model"]
    model["storageURI"] = model.pop("storageUri")
    assert_rejected(isvc, "spec.predictor.model", "'storageURI' was unexpected")


def test_rejects_latest_image(prod: list[Manifest]) -> None:
    collector = find(prod, "Deployment", "feedback-collector")
    collector["spec"]["template"]["spec"]["containers"][0]["image"] = "ghcr.io/llm-auction/serving:latest"
    assert_rejected(collector, "[image]", ":latest")


def test_rejects_untagged_image(prod: list[Manifest]) -> None:
    isvc = find(prod, "InferenceService", "policy")
    isvc["spec"]["transformer"]["containers"][0]["image"] = "ghcr.io/llm-auction/serving"
    assert_rejected(isvc, "[image]", "has no tag")


def test_rejects_root_container(prod: list[Manifest]) -> None:
    mlflow = find(prod, "Deployment", "mlflow")
    mlflow["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = 0
    assert_rejected(mlflow, "[security]", "'mlflow' runs as root (runAsUser: 0)")


def test_rejects_trainjob_without_non_root_patch(prod: list[Manifest]) -> None:
    trainjob = find(prod, "TrainJob", "irpo-dpo-template")
    del trainjob["spec"]["runtimePatches"]
    assert_rejected(trainjob, "[security]", "does not set runAsNonRoot: true")


def test_rejects_container_without_limits(prod: list[Manifest]) -> None:
    redis = find(prod, "Deployment", "redis")
    del redis["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert_rejected(redis, "[resources]", "'redis' sets no limits for cpu, memory")


def test_rejects_plaintext_secrets(prod: list[Manifest]) -> None:
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "llm-auction-s3", "namespace": NAMESPACE},
        "stringData": {"AWS_SECRET_ACCESS_KEY": "hunter2"},
    }
    assert_rejected(secret, "[secret]", "literal values in stringData (AWS_SECRET_ACCESS_KEY)")
    mlflow = find(prod, "Deployment", "mlflow")
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    container["env"] = [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]
    container["args"].append("--backend-store-uri=postgresql://mlflow:hunter2@db:5432/mlflow")
    assert_rejected(mlflow, "[secret]", "env AWS_SECRET_ACCESS_KEY has a literal value")
    assert_rejected(mlflow, "[secret]", "a URL with an embedded password")


def test_accepts_secret_references(prod: list[Manifest]) -> None:
    mlflow = find(prod, "Deployment", "mlflow")
    mlflow["spec"]["template"]["spec"]["containers"][0]["args"].append(
        "--uri=postgresql://u:$(PASSWORD)@db/x"
    )
    assert problems_of(mlflow) == []


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("runtime", "kserve-tritonserver", "serving runtime 'kserve-tritonserver' is not installed"),
        ("modelFormat", {"name": "vLLM"}, "does not serve model format 'vLLM'"),
    ],
)
def test_rejects_runtime_or_model_format_the_cluster_lacks(
    prod: list[Manifest], field: str, value: Any, needle: str
) -> None:
    isvc = find(prod, "InferenceService", "policy")
    isvc["spec"]["predictor"]["model"][field] = value
    assert_rejected(isvc, "[runtime]", needle)


def test_rejects_knative_canary_field_in_standard_mode(prod: list[Manifest]) -> None:
    isvc = find(prod, "InferenceService", "policy")
    isvc["spec"]["predictor"]["canaryTrafficPercent"] = 10
    assert_rejected(isvc, "[canary]", "canaryTrafficPercent is Knative-only")


def test_rejects_misspelt_core_field(prod: list[Manifest]) -> None:
    deployment = find(prod, "Deployment", "feast-feature-server")
    deployment["spec"]["replica"] = deployment["spec"].pop("replicas")
    assert_rejected(deployment, "[schema]", "'replica' was unexpected")


def test_rejects_kind_without_schema() -> None:
    doc = {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
    assert_rejected(doc, "Widget/w", "no schema for example.com/v1 Widget")


def test_scheduled_workflow_needs_no_status() -> None:
    swf: Manifest = {
        "apiVersion": "kubeflow.org/v1beta1",
        "kind": "ScheduledWorkflow",
        "metadata": {"name": "irpo-epoch", "namespace": NAMESPACE},
        "spec": {"enabled": True, "trigger": {"cronSchedule": {"cron": "0 0 3 * * *"}}},
    }
    assert problems_of(swf) == []
    del swf["spec"]
    assert_rejected(swf, "ScheduledWorkflow/irpo-epoch", "'spec' is a required property")


def test_missing_kubectl_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate_module.shutil, "which", lambda name: None)
    with pytest.raises(KubectlNotFoundError, match="kubectl not found on PATH"):
        render_overlay("dev")


def test_render_failure_is_a_problem(tmp_path: Path, kubectl: str) -> None:
    (tmp_path / "overlays" / "broken").mkdir(parents=True)
    (tmp_path / "overlays" / "broken" / "kustomization.yaml").write_text("resources: [missing.yaml]\n")
    problems = validate_module.validate_overlay("broken", deploy_dir=tmp_path)
    assert [p.check for p in problems] == ["render"]
    assert isinstance(problems[0], Problem) and "missing.yaml" in problems[0].message


@pytest.mark.parametrize(
    "dockerfile", sorted((REPO / "infra" / "images").glob("*.Dockerfile")), ids=lambda p: p.stem
)
def test_dockerfile_pins_bases_and_drops_root(dockerfile: Path) -> None:
    assert check_dockerfile(dockerfile.read_text()) == []


def test_dockerfile_check_rejects_what_it_should() -> None:
    problems = check_dockerfile("FROM python:latest\nARG GITHUB_TOKEN\nRUN true\n")
    assert any(":latest" in p for p in problems)
    assert any("GITHUB_TOKEN" in p for p in problems)
    assert any("non-root USER" in p for p in problems)


def test_every_image_has_a_dockerfile() -> None:
    assert sorted(p.stem for p in (REPO / "infra" / "images").glob("*.Dockerfile")) == [
        "component",
        "component-cuda",
        "serving",
    ]


def test_make_images_without_a_daemon_fails_clearly() -> None:
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    result = subprocess.run(
        ["bash", str(REPO / "infra" / "build-images.sh")], capture_output=True, text=True, env=env, timeout=60
    )
    assert result.returncode != 0
    assert "docker" in result.stderr.lower() and "make images" in result.stderr


@pytest.mark.parametrize("script", ["build-images.sh", "deploy.sh"])
def test_infra_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(REPO / "infra" / script)], check=True, timeout=30)
