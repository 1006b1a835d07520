"""The policy endpoint's canary and promotions, carried out where serving runs.

The server itself splits users between the arms (a stable hash of user_id, `serving.split`) and
follows the registry's aliases; what is rolled here is what it generates with:

- `local`: records under `<data_dir>/serving/`: `canary.json` (the running canary), one line of
  `canary-history.jsonl` per ended canary, `champion.json` (the last promotion);
- `cluster`: the challenger's own predictor-only InferenceService `policy-challenger`, built from the
  live `policy` (`challenger_isvc`), which the transformer of `policy` sends the challenger arm's
  generation to (`serving.challenger_predictor_url`); it is created when the canary starts and
  deleted when it ends, and a promotion patches `policy`'s storageUri (`promotion_patch`). KServe's
  own canaries split each request at random, so a user would see both arms: none is used.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client as k8s
from kubernetes import config as k8s_config

from llm_auction.config import Settings
from llm_auction.tracking import registry

ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")
POLICY, CHALLENGER = "policy", "policy-challenger"
DECISIONS = ("promote", "rollback", "inconclusive")
CHAMPION_FILE = "serving/champion.json"
CANARY_FILE = "serving/canary.json"
HISTORY_FILE = "serving/canary-history.jsonl"
# Labels of the challenger: its role, and cluster-local (KServe makes no external route for it).
CHALLENGER_LABELS = {"llm-auction.io/arm": "challenger", "networking.kserve.io/visibility": "cluster-local"}
_NOT_COPIED = ("kubectl.kubernetes.io/last-applied-configuration",)
_MODEL_NAME = "--model_name="

Manifest = dict[str, Any]


def challenger_isvc(policy_isvc: Manifest, storage_uri: str, name: str = CHALLENGER) -> Manifest:
    """The challenger's InferenceService: `policy`'s predictor serving `storage_uri`, nothing else.

    Same deployment mode, annotations and predictor (runtime, arguments, resources, account) as
    `policy`; no transformer and no logger (the transformer of `policy` calls it and logs both
    arms); it serves under `policy`'s model name, which the transformer's completions name.
    """
    if not storage_uri:
        raise ValueError("storage_uri: the challenger needs its artifacts' URI")
    meta = policy_isvc.get("metadata") or {}
    predictor = copy.deepcopy((policy_isvc.get("spec") or {}).get("predictor") or {})
    if not isinstance(predictor.get("model"), dict):
        raise ValueError(f"{meta.get('name')}: no spec.predictor.model to copy")
    predictor.pop("canaryTrafficPercent", None)  # Knative's split; the user-hash split replaces it
    model = predictor["model"]
    args = model.get("args") or []
    # The runtime passes `--model_name={{.Name}}` (the InferenceService's name) and KServe appends
    # the model's args to the runtime's: the last flag wins.
    named = [a.removeprefix(_MODEL_NAME) for a in args if a.startswith(_MODEL_NAME)]
    served = named[-1] if named else meta.get("name", POLICY)
    model["storageUri"] = storage_uri
    model["args"] = [*(a for a in args if not a.startswith(_MODEL_NAME)), f"{_MODEL_NAME}{served}"]
    metadata: Manifest = {
        "name": name,
        "labels": {
            **(meta.get("labels") or {}),
            **CHALLENGER_LABELS,
            "llm-auction.io/challenger-of": meta.get("name", POLICY),
        },
        "annotations": {k: v for k, v in (meta.get("annotations") or {}).items() if k not in _NOT_COPIED},
    }
    if meta.get("namespace"):
        metadata["namespace"] = meta["namespace"]
    return {
        "apiVersion": policy_isvc.get("apiVersion", "/".join(ISVC[:2])),
        "kind": "InferenceService",
        "metadata": metadata,
        "spec": {"predictor": predictor},
    }


def promotion_patch(storage_uri: str) -> Manifest:
    """The merge patch that points `policy`'s predictor at the promoted version's artifacts."""
    if not storage_uri:
        raise ValueError("storage_uri: a promotion needs the version's artifacts' URI")
    return {"spec": {"predictor": {"model": {"storageUri": storage_uri}}}}


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _api() -> Any:
    k8s_config.load_incluster_config()
    return k8s.CustomObjectsApi()


def _source(settings: Settings, version: str) -> str:
    return registry.version_source(settings.tracking, settings.irpo.registered_model, version)


def start_canary(settings: Settings, version: str) -> dict:
    """Serve `version` as the challenger if the registry names it so; anything else starts nothing.

    Returns `{"started", "challenger", "canary_percent", "source", "started_at"}` and where it went
    (`record`, or `inferenceservice`, `namespace` and `action`: created or replaced), or
    `{"started": False, "challenger", "version"}`.
    """
    name = settings.irpo.registered_model
    challenger = registry.alias_version(settings.tracking, name, registry.CHALLENGER)
    if challenger != version:
        return {"started": False, "challenger": challenger, "version": version}
    record = {
        "started": True,
        "challenger": version,
        "canary_percent": settings.serving.canary_percent,
        "source": _source(settings, version),
        "started_at": _now(),
    }
    if settings.profile == "local":
        return {**record, "record": str(_write_record(settings.data_dir / CANARY_FILE, record))}
    namespace = settings.irpo.distributed.namespace
    return {**record, **_apply_challenger(_api(), namespace, record["source"])}


def _write_record(path: Path, record: dict) -> Path:
    """The local profile's deployment: a JSON record the local server's reload does not need but a
    reviewer reads (what was deployed, from where, when).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def _apply_challenger(api: Any, namespace: str, storage_uri: str) -> dict:
    """Create `policy-challenger` from the live `policy`, or replace the one a previous canary left."""
    group, version, plural = ISVC
    body = challenger_isvc(
        api.get_namespaced_custom_object(group, version, namespace, plural, POLICY), storage_uri
    )
    body["metadata"]["namespace"] = namespace
    where = {"inferenceservice": CHALLENGER, "namespace": namespace}
    try:
        api.create_namespaced_custom_object(group, version, namespace, plural, body)
        return {**where, "action": "created"}
    except k8s.ApiException as error:
        if error.status != 409:
            raise
    existing = api.get_namespaced_custom_object(group, version, namespace, plural, CHALLENGER)
    body["metadata"]["resourceVersion"] = existing["metadata"]["resourceVersion"]
    api.replace_namespaced_custom_object(group, version, namespace, plural, CHALLENGER, body)
    return {**where, "action": "replaced"}


def _delete_challenger(api: Any, namespace: str) -> dict:
    group, version, plural = ISVC
    try:
        api.delete_namespaced_custom_object(group, version, namespace, plural, CHALLENGER)
        deleted = True
    except k8s.ApiException as error:
        if error.status != 404:
            raise
        deleted = False
    return {"inferenceservice": CHALLENGER, "namespace": namespace, "deleted": deleted}


def end_canary(settings: Settings, version: str, decision: str) -> dict:
    """Take the challenger `version` off serving after the canary's `decision`; `promote` also rolls
    it out as the champion (`roll_out`, after the registry moved `champion`).

    Returns `{"challenger", "decision", "ended_at"}` with, locally, the started record's fields and
    `history` (the file the record was appended to), on the cluster `inferenceservice`, `namespace`
    and `deleted`; a promotion adds `promotion` (what `roll_out` returned).
    """
    if decision not in DECISIONS:
        raise ValueError(f"decision: {decision!r} is not one of {', '.join(DECISIONS)}")
    record: dict[str, Any] = {"challenger": version, "decision": decision, "ended_at": _now()}
    promotion = roll_out(settings, version) if decision == "promote" else None
    if settings.profile == "local":
        canary = settings.data_dir / CANARY_FILE
        started = json.loads(canary.read_text()) if canary.is_file() else {}
        started.pop("started", None)
        record = {**started, **record}
        history = settings.data_dir / HISTORY_FILE
        history.parent.mkdir(parents=True, exist_ok=True)
        with history.open("a") as lines:
            lines.write(json.dumps(record) + "\n")
        canary.unlink(missing_ok=True)
        record["history"] = str(history)
    else:
        record |= _delete_challenger(_api(), settings.irpo.distributed.namespace)
    return record if promotion is None else {**record, "promotion": promotion}


def roll_out(settings: Settings, version: str) -> dict:
    """Point the champion's serving at `version` if the registry's `champion` is it; else nothing.

    Returns `{"rolled", "champion", "source", "at"}` with `pointer` (the local record) or
    `inferenceservice` and `namespace` (the patched `policy`), or `{"rolled": False, "champion",
    "version"}`.
    """
    model = settings.irpo.registered_model
    champion = registry.alias_version(settings.tracking, model, registry.CHAMPION)
    if champion != version:
        return {"rolled": False, "champion": champion, "version": version}
    source = _source(settings, version)
    record = {"rolled": True, "champion": version, "source": source, "at": _now()}
    if settings.profile == "local":
        return {**record, "pointer": str(_write_record(settings.data_dir / CHAMPION_FILE, record))}
    namespace = settings.irpo.distributed.namespace
    group, api_version, plural = ISVC
    _api().patch_namespaced_custom_object(
        group, api_version, namespace, plural, POLICY, promotion_patch(source)
    )
    return {**record, "inferenceservice": POLICY, "namespace": namespace}
