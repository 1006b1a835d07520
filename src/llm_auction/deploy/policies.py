"""The project's policies for what may be applied, checked on each rendered object.

A schema says what an object may contain; these say what ours must: images pinned to a version, pods
that cannot run as root, requests and limits on every container, no credential in a manifest, and model
servers and training runtimes that the cluster really has (`../shared/runtimes`). Pods are found where
each kind keeps them: the pod template of a workload, the component specs of an InferenceService (a
canary inherits what it leaves out from the predictor), the runtime patches of a TrainJob.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llm_auction.config import deep_merge
from llm_auction.deploy.problem import Manifest, Problem, describe

_POD_SPEC_PATHS: dict[str, tuple[str, ...]] = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
_ISVC_COMPONENTS = ("predictor", "transformer", "explainer")
# Where a component names its model server: `model` since KServe 0.8, the per-framework keys before it.
_ISVC_MODEL_KEYS = (
    "model",
    "huggingface",
    "lightgbm",
    "onnx",
    "paddle",
    "pmml",
    "pytorch",
    "sklearn",
    "tensorflow",
    "triton",
    "xgboost",
)
_STANDARD_MODES = ("Standard", "RawDeployment")
_DEPLOYMENT_MODE = "serving.kserve.io/deploymentMode"
_REQUIRED_RESOURCES = ("cpu", "memory")
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
_URL_CREDENTIALS = re.compile(r"[a-z][a-z0-9+.-]*://[^\s/:@]+:(?P<password>[^\s/@]+)@", re.I)


@dataclass(frozen=True)
class Workload:
    """The pods an object will create: pod-level fields and the containers they run.

    Attributes:
        where: the path of the pod spec in the object, for messages.
        pod: the pod spec (only `securityContext` is read).
        containers: containers and init containers, each with `name`, `securityContext`, `resources`.
    """

    where: str
    pod: Manifest
    containers: list[Manifest]


@dataclass(frozen=True)
class RuntimeCatalog:
    """The serving and training runtimes a cluster offers.

    Attributes:
        serving: runtime name -> its `supportedModelFormats`.
        training: (kind, name) of each training runtime.
    """

    serving: dict[str, list[Manifest]] = field(default_factory=dict)
    training: frozenset[tuple[str, str]] = frozenset()

    @classmethod
    def from_documents(cls, docs: Iterable[Manifest]) -> RuntimeCatalog:
        """Collect the runtimes among `docs` (the shared runtimes plus any an overlay itself defines)."""
        serving: dict[str, list[Manifest]] = {}
        training: set[tuple[str, str]] = set()
        for doc in docs:
            kind, name = doc.get("kind"), (doc.get("metadata") or {}).get("name")
            if kind in ("ClusterServingRuntime", "ServingRuntime"):
                serving[name] = list((doc.get("spec") or {}).get("supportedModelFormats") or [])
            elif kind in ("ClusterTrainingRuntime", "TrainingRuntime"):
                training.add((kind, name))
        return cls(serving=serving, training=frozenset(training))


def _dig(node: Any, path: Iterable[str]) -> Any:
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node


def _items(node: Any, path: str = "") -> Iterator[tuple[str, Any, Any]]:
    """Every (path, key, value) below `node`, list indices included, depth first."""
    pairs: Iterable[tuple[Any, Any]]
    if isinstance(node, dict):
        pairs = node.items()
    elif isinstance(node, list):
        pairs = enumerate(node)
    else:
        return
    for key, value in pairs:
        child = f"{path}.{key}" if path else str(key)
        yield child, key, value
        yield from _items(value, child)


def _pod_containers(pod: Manifest) -> list[Manifest]:
    return [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]


def isvc_components(doc: Manifest) -> list[tuple[str, Manifest]]:
    """The component specs of an InferenceService, each canary merged over the predictor as KServe does."""
    spec = doc.get("spec") or {}
    components = [
        (f"spec.{name}", spec[name]) for name in _ISVC_COMPONENTS if isinstance(spec.get(name), dict)
    ]
    predictor = spec.get("predictor") if isinstance(spec.get("predictor"), dict) else {}
    for index, canary in enumerate(spec.get("canary") or []):
        if isinstance(canary, dict) and isinstance(canary.get("predictor"), dict):
            components.append((f"spec.canary.{index}.predictor", deep_merge(predictor, canary["predictor"])))
    return components


def _isvc_workloads(doc: Manifest) -> list[Workload]:
    workloads = []
    for where, component in isvc_components(doc):
        containers = _pod_containers(component)
        for key in _ISVC_MODEL_KEYS:
            if isinstance(component.get(key), dict):
                containers.append({"name": "kserve-container", **component[key]})
        workloads.append(Workload(where, component, containers))
    return workloads


def _trainjob_workloads(doc: Manifest) -> list[Workload]:
    """The training node pod: the runtime's, as patched by `runtimePatches`, running `spec.trainer`."""
    spec = doc.get("spec") or {}
    pod: Manifest = {}
    for patch in spec.get("runtimePatches") or []:
        for job in _dig(patch, ("trainingRuntimeSpec", "template", "spec", "replicatedJobs")) or []:
            if isinstance(job, dict) and job.get("name") == "node":
                pod = deep_merge(pod, _dig(job, ("template", "spec", "template", "spec")) or {})
    patched = next((c for c in pod.get("containers") or [] if c.get("name") == "node"), {})
    trainer = spec.get("trainer") or {}
    node = {
        "name": "node",
        "securityContext": patched.get("securityContext") or {},
        "resources": trainer.get("resourcesPerNode") or {},
    }
    return [Workload("spec.runtimePatches[node]", pod, [node])]


def workloads(doc: Manifest) -> list[Workload]:
    """The pods that `doc` creates, wherever its kind keeps their spec."""
    kind = doc.get("kind")
    if kind in _POD_SPEC_PATHS:
        pod = _dig(doc, _POD_SPEC_PATHS[kind])
        if not isinstance(pod, dict):
            return []
        return [Workload(".".join(_POD_SPEC_PATHS[kind]), pod, _pod_containers(pod))]
    if kind == "InferenceService":
        return _isvc_workloads(doc)
    if kind == "TrainJob":
        return _trainjob_workloads(doc)
    return []


def image_problem(reference: str) -> str | None:
    """Why an image reference is not pinned, or None if it is (a version tag or a digest)."""
    if "@sha256:" in reference:
        return None
    name = reference.rsplit("/", 1)[-1]
    if ":" not in name:
        return f"image {reference!r} has no tag: pin a version"
    if name.rsplit(":", 1)[1] == "latest":
        return f"image {reference!r} uses the mutable tag :latest: pin a version"
    return None


def check_images(doc: Manifest) -> list[Problem]:
    """Every `image` anywhere in the object is pinned, so what runs is what was validated."""
    return [
        Problem(describe(doc), "image", f"{path}: {problem}")
        for path, key, value in _items(doc)
        if key == "image" and isinstance(value, str) and (problem := image_problem(value))
    ]


def _security_messages(ctx: Manifest) -> list[str]:
    messages = []
    if ctx.get("privileged"):
        messages.append("is privileged (root on the node)")
    if ctx.get("runAsUser") == 0:
        messages.append("runs as root (runAsUser: 0)")
    elif ctx.get("runAsUser") is None:
        messages.append("sets no runAsUser: give a numeric non-root uid, which the kubelet can verify")
    if ctx.get("runAsNonRoot") is not True:
        messages.append("does not set runAsNonRoot: true")
    return messages


def check_security(doc: Manifest) -> list[Problem]:
    """No container may run as root: runAsNonRoot and a non-zero runAsUser, from the pod or the container."""
    problems = []
    for workload in workloads(doc):
        pod_ctx = workload.pod.get("securityContext") or {}
        for container in workload.containers:
            ctx = {**pod_ctx, **(container.get("securityContext") or {})}
            where = f"{workload.where} container {container.get('name', '?')!r}"
            problems += [Problem(describe(doc), "security", f"{where} {m}") for m in _security_messages(ctx)]
    return problems


def check_resources(doc: Manifest) -> list[Problem]:
    """Every container requests and limits CPU and memory, so the scheduler and the quota can count it."""
    problems = []
    for workload in workloads(doc):
        for container in workload.containers:
            resources = container.get("resources") or {}
            for section in ("requests", "limits"):
                missing = [r for r in _REQUIRED_RESOURCES if r not in (resources.get(section) or {})]
                if missing:
                    where = f"{workload.where} container {container.get('name', '?')!r}"
                    message = f"{where} sets no {section} for {', '.join(missing)}"
                    problems.append(Problem(describe(doc), "resources", message))
    return problems


def _literal_secret_env(path: str, env: list[Any]) -> list[str]:
    return [
        f"{path}: env {var['name']} has a literal value: take it from a Secret (valueFrom.secretKeyRef)"
        for var in env
        if isinstance(var, dict) and var.get("value") and _SECRET_NAME.search(str(var.get("name", "")))
    ]


def check_secrets(doc: Manifest) -> list[Problem]:
    """No credential in a manifest: no Secret values, no secret-named literal env, no password in a URL."""
    messages = []
    if doc.get("kind") == "Secret":
        for section in ("data", "stringData"):
            keys = sorted(key for key, value in (doc.get(section) or {}).items() if value)
            if keys:
                messages.append(
                    f"literal values in {section} ({', '.join(keys)}): create the Secret out of band "
                    "from deploy/secrets/*.env (see deploy/secrets/README.md)"
                )
    for path, key, value in _items(doc):
        if key == "env" and isinstance(value, list):
            messages += _literal_secret_env(path, value)
        elif isinstance(value, str) and (match := _URL_CREDENTIALS.search(value)):
            if not match.group("password").startswith("$"):
                messages.append(f"{path}: a URL with an embedded password: take it from a Secret")
    return [Problem(describe(doc), "secret", message) for message in messages]


def _supports(formats: list[Manifest], name: Any, version: Any, auto_select: bool) -> bool:
    return any(
        fmt.get("name") == name
        and (version is None or str(fmt.get("version")) == str(version))
        and (fmt.get("autoSelect", False) or not auto_select)
        for fmt in formats
    )


def _model_runtime_messages(where: str, model: Manifest, catalog: RuntimeCatalog) -> list[str]:
    model_format = model.get("modelFormat") or {}
    name, version = model_format.get("name"), model_format.get("version")
    shown = f"{name!r}" + (f" version {version!r}" if version is not None else "")
    runtime = model.get("runtime")
    if runtime is None:
        if any(_supports(formats, name, version, auto_select=True) for formats in catalog.serving.values()):
            return []
        return [f"{where}: no installed serving runtime auto-selects model format {shown}"]
    if runtime not in catalog.serving:
        return [
            f"{where}: serving runtime {runtime!r} is not installed (installed: {sorted(catalog.serving)})"
        ]
    if not _supports(catalog.serving[runtime], name, version, auto_select=False):
        served = sorted(str(fmt.get("name")) for fmt in catalog.serving[runtime])
        return [f"{where}: runtime {runtime!r} does not serve model format {shown} (it serves {served})"]
    return []


def check_runtimes(doc: Manifest, catalog: RuntimeCatalog) -> list[Problem]:
    """The serving runtime and model format, or the training runtime, that an object names exist."""
    messages = []
    if doc.get("kind") == "InferenceService":
        for where, component in isvc_components(doc):
            if isinstance(component.get("model"), dict):
                messages += _model_runtime_messages(where, component["model"], catalog)
    elif doc.get("kind") == "TrainJob":
        ref = _dig(doc, ("spec", "runtimeRef")) or {}
        key = (ref.get("kind", "ClusterTrainingRuntime"), ref.get("name"))
        if key not in catalog.training:
            installed = sorted(name for _, name in catalog.training)
            messages.append(f"spec.runtimeRef: {key[0]} {key[1]!r} is not installed (installed: {installed})")
    return [Problem(describe(doc), "runtime", message) for message in messages]


def _canary_messages(spec: Manifest, mode: Any) -> list[str]:
    messages = []
    canaries = [c for c in spec.get("canary") or [] if isinstance(c, dict)]
    if canaries and mode not in _STANDARD_MODES:
        messages.append(f"spec.canary needs the annotation {_DEPLOYMENT_MODE}: Standard (it is {mode!r})")
    if mode in _STANDARD_MODES:
        messages += [
            f"spec.{name}.canaryTrafficPercent is Knative-only; Standard mode uses spec.canary"
            for name in _ISVC_COMPONENTS
            if isinstance(spec.get(name), dict) and "canaryTrafficPercent" in spec[name]
        ]
    names = [_dig(c, ("predictor", "name")) for c in canaries]
    if any(not name for name in names) or len(set(names)) != len(names):
        messages.append("every spec.canary entry needs a predictor.name, unique among them")
    if sum(int(c.get("trafficPercent") or 0) for c in canaries) > 100:
        messages.append("spec.canary trafficPercent values add up to more than 100")
    return messages


def check_canary(doc: Manifest) -> list[Problem]:
    """A canary is declared the way the deployment mode supports (the field differs between modes)."""
    if doc.get("kind") != "InferenceService":
        return []
    mode = ((doc.get("metadata") or {}).get("annotations") or {}).get(_DEPLOYMENT_MODE)
    return [Problem(describe(doc), "canary", m) for m in _canary_messages(doc.get("spec") or {}, mode)]


def check_policies(doc: Manifest, catalog: RuntimeCatalog) -> list[Problem]:
    """Every policy check on one object."""
    return [
        *check_images(doc),
        *check_security(doc),
        *check_resources(doc),
        *check_secrets(doc),
        *check_runtimes(doc, catalog),
        *check_canary(doc),
    ]
