"""The MLflow model registry: a logged artifact folder becomes a version of a registered model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import mlflow.artifacts

from llm_auction.config import Settings, TrackingConfig
from llm_auction.errors import RegistryError
from llm_auction.tracking.runs import mlflow_client


def register_version(
    cfg: TrackingConfig,
    name: str,
    run_id: str,
    artifact_path: str,
    tags: Mapping[str, Any] | None = None,
    description: str | None = None,
) -> str:
    """Create the registered model if needed and add the run's artifacts as a new version."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name)
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    version = client.create_model_version(
        name,
        source,
        run_id=run_id,
        tags={k: str(v) for k, v in (tags or {}).items()},
        description=description,
    )
    return str(version.version)


CHAMPION, CHALLENGER = "champion", "challenger"
HEAD = "head"
INITIAL = "pi0"
"""pi_0, the SFT warm start IRPO's lineage starts from: what every candidate's drift is also measured
against (KL to pi_0), whichever policy its epoch improved."""
"""The tip of IRPO's line of candidates (`irpo.start_policy: head`): the latest version the offline
gate admitted that live traffic has not rolled back; the next epoch improves it. Absent: the champion."""
ADAPTER_DIR = "adapter"
"""A DPO version's LoRA adapter, beside its merged weights."""
BASE_VERSION_TAG = "lineage.base_version"
"""The version a DPO version's adapter was trained on (the DPO step's lineage `base_version`)."""
HISTORY_TAG = "llm_auction.champion_history"


def _client(cfg: TrackingConfig):  # noqa: ANN202
    if cfg.uri is None:
        raise RegistryError("tracking.uri: the registry needs an MLflow tracking URI")
    return mlflow_client(cfg)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def alias_version(cfg: TrackingConfig, name: str, alias: str) -> str | None:
    """The version an alias points at, or None when it points nowhere (or the model does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(_client(cfg).get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def _version(client: Any, name: str, version: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException:
        raise RegistryError(f"version: {name} has no version {version!r}") from None


def annotate_version(
    cfg: TrackingConfig, name: str, version: str, tags: Mapping[str, Any], description: str | None = None
) -> None:
    """Add tags (and replace the description: the review card) of one version."""
    client = _client(cfg)
    _version(client, name, version)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    if description is not None:
        client.update_model_version(name, version, description=description)


def version_source(cfg: TrackingConfig, name: str, version: str) -> str:
    """Where the version's files are (an artifact URI: a folder locally, s3://... on the cluster)."""
    return str(_version(_client(cfg), name, version).source)


def set_alias(cfg: TrackingConfig, name: str, alias: str, version: str) -> None:
    client = _client(cfg)
    _version(client, name, version)
    client.set_registered_model_alias(name, alias, version)


def snapshot(cfg: TrackingConfig, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each model's aliases and champion history: what a step that moves them can be undone to."""
    from mlflow.exceptions import MlflowException

    client, out = _client(cfg), {}
    for name in names:
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            continue  # not registered yet: nothing to restore
        out[name] = {
            "aliases": {a: str(v) for a, v in (model.aliases or {}).items()},
            "history": model.tags.get(HISTORY_TAG, ""),
        }
    return out


def restore(cfg: TrackingConfig, state: Mapping[str, Mapping[str, Any]]) -> None:
    """Put aliases and champion histories back as `snapshot` found them (versions stay registered)."""
    client = _client(cfg)
    for name, saved in state.items():
        model = client.get_registered_model(name)
        for alias in set(model.aliases or {}) - set(saved["aliases"]):
            client.delete_registered_model_alias(name, alias)
        for alias, version in saved["aliases"].items():
            client.set_registered_model_alias(name, alias, version)
        client.set_registered_model_tag(name, HISTORY_TAG, saved["history"])


class Versions(NamedTuple):
    """What the registry says should serve: the policy's two aliases and psi's champion."""

    champion: str | None
    challenger: str | None
    pctr: str | None


def current_versions(settings: Settings) -> Versions:
    """The registry's champion and challenger policy versions and champion pCTR version.

    The pCTR is its `champion` alias, not the newest version: a psi the gate held never prices.
    A challenger equal to the champion is no challenger.
    """
    if settings.tracking.uri is None:
        return Versions(None, None, None)
    name = settings.irpo.registered_model
    champion = alias_version(settings.tracking, name, CHAMPION)
    challenger = alias_version(settings.tracking, name, CHALLENGER)
    pctr = alias_version(settings.tracking, settings.pctr.registered_model, CHAMPION)
    return Versions(champion, None if challenger == champion else challenger, pctr)


def approve(cfg: TrackingConfig, name: str, version: str, who: str) -> None:
    """The manual gate's approval: `approved=true` on the version, with who and when."""
    annotate_version(cfg, name, version, {"approved": "true", "approved_by": who, "approved_at": _now()})


def is_approved(cfg: TrackingConfig, name: str, version: str) -> bool:
    return _version(_client(cfg), name, version).tags.get("approved") == "true"


def promote(cfg: TrackingConfig, name: str, version: str, who: str, reason: str) -> str | None:
    """Move `champion` to `version`; returns the previous champion. The history makes rollback possible."""
    client = _client(cfg)
    _version(client, name, version)
    previous = alias_version(cfg, name, CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, version)
    history = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join([*filter(None, history.split(",")), version]))
    tags = {
        "promoted_by": who,
        "promoted_at": _now(),
        "promoted_reason": reason,
        "previous_champion": previous,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    if alias_version(cfg, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    return previous


CANARY_STARTED = "canary.started_at"


def enter_canary(cfg: TrackingConfig, name: str, version: str, who: str) -> None:
    """`challenger` to `version`, stamped with when its canary started (the decision's window)."""
    client = _client(cfg)
    _version(client, name, version)
    client.set_registered_model_alias(name, CHALLENGER, version)
    for key, value in {"canary.status": "running", CANARY_STARTED: _now(), "canary.entered_by": who}.items():
        client.set_model_version_tag(name, version, key, value)


def canary_started_at(cfg: TrackingConfig, name: str, version: str) -> datetime | None:
    started = _version(_client(cfg), name, version).tags.get(CANARY_STARTED)
    return None if started is None else datetime.fromisoformat(started)


def end_canary(
    cfg: TrackingConfig,
    name: str,
    version: str,
    decision: str,
    reason: str,
    who: str,
    numbers: Mapping[str, Any] | None = None,
    card: str | None = None,
) -> None:
    """Record the canary's verdict on the version; `promote` makes it the champion, anything else
    clears `challenger` (the champion stays) with the reason kept on the version; it stays `head`
    only when inconclusive. `card` (markdown) is appended to the version's review card.
    """
    if decision not in ("promote", "rollback", "inconclusive"):
        raise ValueError(f"decision: {decision!r} is not promote, rollback or inconclusive")
    client = _client(cfg)
    current = _version(client, name, version)
    if card:
        description = f"{current.description}\n\n{card}" if current.description else card
        client.update_model_version(name, version, description=description)
    status = {"promote": "promoted", "rollback": "rolled back", "inconclusive": "inconclusive"}[decision]
    tags = {
        "canary.status": status,
        "canary.reason": reason,
        "canary.ended_at": _now(),
        "canary.ended_by": who,
    }
    tags |= {f"canary.{k}": v for k, v in (numbers or {}).items()}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    if decision == "promote":
        promote(cfg, name, version, who, f"canary: {reason}")
    elif alias_version(cfg, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    if decision != "inconclusive" and alias_version(cfg, name, HEAD) == version:
        client.delete_registered_model_alias(name, HEAD)  # promoted: the champion; rolled back: gone


def rollback(cfg: TrackingConfig, name: str, who: str, reason: str) -> tuple[str, str]:
    """Move `champion` back to the version promoted before the current one; returns (from, to)."""
    client = _client(cfg)
    current = alias_version(cfg, name, CHAMPION)
    history = [v for v in client.get_registered_model(name).tags.get(HISTORY_TAG, "").split(",") if v]
    if current is None or len(history) < 2 or history[-1] != current:
        raise RegistryError(f"{name}: no earlier champion to roll back to (history {history or 'empty'})")
    target = history[-2]
    client.set_registered_model_alias(name, CHAMPION, target)
    client.set_registered_model_tag(name, HISTORY_TAG, ",".join(history[:-1]))
    at = _now()
    for key, value in {"rolled_back_by": who, "rolled_back_reason": reason, "rolled_back_at": at}.items():
        client.set_model_version_tag(name, current, key, value)
    for key, value in {"restored_by": who, "restored_reason": reason, "restored_at": at}.items():
        client.set_model_version_tag(name, target, key, value)
    return current, target


def show(cfg: TrackingConfig, name: str) -> dict[str, Any]:
    """Versions (newest first) with their aliases and tags: what a reviewer looks at."""
    from mlflow.exceptions import MlflowException

    client = _client(cfg)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"model: no registered model {name!r}") from None
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    versions = sorted(
        client.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version), reverse=True
    )
    return {
        "name": name,
        "aliases": dict(model.aliases or {}),
        "champion_history": model.tags.get(HISTORY_TAG, ""),
        "versions": [
            {
                "version": str(v.version),
                "aliases": aliases.get(str(v.version), []),
                "run_id": v.run_id,
                "created": datetime.fromtimestamp(v.creation_timestamp / 1000, UTC).isoformat(
                    timespec="seconds"
                ),
                "tags": dict(v.tags),
                "description": v.description or "",
            }
            for v in versions
        ],
    }


MODELS_PREFIX = "models:/"


def registered_version(cfg: TrackingConfig, uri: str) -> tuple[str, str]:
    """(name, version) that `models:/NAME@ALIAS` or `models:/NAME/VERSION` names now."""
    reference = uri.removeprefix(MODELS_PREFIX)
    name, _, alias = reference.partition("@")
    if not alias:
        name, _, version = reference.partition("/")
    else:
        version = alias_version(cfg, name, alias) or ""
    if not uri.startswith(MODELS_PREFIX) or not name or not version:
        raise RegistryError(
            f"policy_uri {uri!r}: no such registered version (is there a {alias or 'version'}?)"
        )
    return name, version


def version_tags(cfg: TrackingConfig, name: str, version: str) -> dict[str, str]:
    return dict(_version(_client(cfg), name, version).tags)


def resolve_model(cfg: TrackingConfig, uri: str, into: Path) -> Path:
    """A model directory from a path, or from the registry: `models:/NAME@ALIAS` or `models:/NAME/VERSION`.

    The version is looked up through this tracking server (not MLflow's process-global registry
    URI), then its files are fetched from their artifact location into `into`.
    """
    if not uri.startswith(MODELS_PREFIX):
        return Path(uri)
    name, version = registered_version(cfg, uri)
    into.mkdir(parents=True, exist_ok=True)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=version_source(cfg, name, version), dst_path=str(into), tracking_uri=cfg.uri
        )
    )
