"""Rolling the serving endpoint to the registry's champion.

- `local`: a record `<data_dir>/serving/champion.json` of what was rolled out and when (the local
  server itself follows the registry's `champion` alias, `serving.server`);
- `cluster`: the InferenceService's canary (`spec.predictor.model.storageUri` of the champion's
  artifacts with `canaryTrafficPercent`), patched through the Kubernetes API.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from llm_auction.config import Settings
from llm_auction.tracking import registry

POINTER = "serving/champion.json"
ISVC = ("serving.kserve.io", "v1beta1", "inferenceservices")


def canary_patch(storage_uri: str, canary_percent: int) -> dict[str, Any]:
    """The merge patch that sends `canary_percent` of the traffic to the new model (KServe Standard mode)."""
    if not 0 <= canary_percent <= 100:
        raise ValueError(f"canary_percent: {canary_percent} is not within 0..100")
    return {
        "spec": {"predictor": {"canaryTrafficPercent": canary_percent, "model": {"storageUri": storage_uri}}}
    }


def roll_out(
    settings: Settings, version: str, canary_percent: int = 10, name: str = "llm-auction-policy"
) -> dict:
    """Point serving at `version` if it is the champion; a held candidate rolls nothing."""
    model = settings.irpo.registered_model
    champion = registry.alias_version(settings.tracking, model, registry.CHAMPION)
    if champion != version:
        return {"rolled": False, "champion": champion, "version": version}
    source = registry.version_source(settings.tracking, model, version)
    record = {"rolled": True, "champion": version, "source": source, "at": datetime.now(UTC).isoformat()}
    if settings.profile == "local":
        pointer = settings.data_dir / POINTER
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps(record, indent=2) + "\n")
        return {**record, "pointer": str(pointer)}
    from kubernetes import client, config

    config.load_incluster_config()
    group, api_version, plural = ISVC
    client.CustomObjectsApi().patch_namespaced_custom_object(
        group,
        api_version,
        settings.irpo.distributed.namespace,
        plural,
        name,
        canary_patch(source, canary_percent),
    )
    return {**record, "canary_percent": canary_percent}
