"""Open the Feast feature store of a profile, with the repository's definitions applied.

`feature_repo/` holds one `definitions.py` and a `feature_store.yaml` per profile. The YAML gives
the kind of each store; the settings give where they are (`features.data_dir`,
`features.registry_uri`, `features.redis_url`), so one configuration drives both the library and
the Feast CLI. The definitions read their data folder and click-history windows through
`definitions_config`: from the settings `open_store` was given while it runs them, else from the
profile and the `LLM_AUCTION__FEATURES__*` environment (how the Feast CLI runs them).
"""

from __future__ import annotations

import logging
import os
import re
import runpy
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import yaml
from feast import Entity, FeatureService, FeatureStore, FeatureView, RepoConfig
from feast.data_source import DataSource

from llm_auction.config import ConfigError, FeaturesConfig, Settings, load_config

logger = logging.getLogger(__name__)

PROJECT = "llm_auction"
DEFINITIONS_FILE = "definitions.py"
STORE_YAML = {"local": "feature_store.yaml", "cluster": "feature_store.cluster.yaml"}
REGISTRY_FILE = "registry.db"
ONLINE_FILE = "online_store.db"

FeastObject = Entity | DataSource | FeatureView | FeatureService

# The features config definitions.py is being built for; None outside `load_definitions`.
_ACTIVE_FEATURES: ContextVar[FeaturesConfig | None] = ContextVar("_ACTIVE_FEATURES", default=None)


def is_remote(location: str) -> bool:
    """True for object-store URIs (s3://...), which are never resolved against a folder."""
    return "://" in location


def absolute_features(features: FeaturesConfig, base: Path) -> FeaturesConfig:
    """The same config with a local `data_dir` made absolute against `base`.

    Feast stores source paths in the registry as given, so a relative one would mean a different
    folder to every process that reads the registry.
    """
    if is_remote(features.data_dir):
        return features.model_copy(update={"data_dir": features.data_dir.rstrip("/")})
    path = Path(features.data_dir).expanduser()
    return features.model_copy(update={"data_dir": str(path if path.is_absolute() else base / path)})


def definitions_config(project_root: Path) -> FeaturesConfig:
    """The features config `feature_repo/definitions.py` builds its objects for.

    Args:
        project_root: Folder a relative `data_dir` is taken from when the Feast CLI runs the
            definitions (the CLI changes into the repository first, so the working directory
            would point inside it).
    """
    active = _ACTIVE_FEATURES.get()
    if active is not None:
        return active
    features = absolute_features(load_config().features, project_root)
    if not is_remote(features.data_dir):
        # The local feature_store.yaml keeps the registry here; Feast writes it but makes no folders.
        Path(features.data_dir).mkdir(parents=True, exist_ok=True)
    return features


def data_path(features: FeaturesConfig, name: str) -> str:
    """Location of one dataset (a folder of parquet files) under the offline store."""
    return f"{features.data_dir.rstrip('/')}/{name}"


def repo_dir(features: FeaturesConfig) -> Path:
    """The Feast repository: `features.repo_dir`, else beside the source checkout of the package.

    The fallback lets tests and notebooks run from any folder of an editable install.
    """
    if features.repo_dir.is_absolute() or (Path.cwd() / features.repo_dir).is_dir():
        found = features.repo_dir.resolve()
    else:
        found = Path(__file__).resolve().parents[3] / features.repo_dir
    if not (found / DEFINITIONS_FILE).is_file():
        raise FileNotFoundError(f"features.repo_dir: no {DEFINITIONS_FILE} in {found}")
    return found


@contextmanager
def _building_for(features: FeaturesConfig) -> Iterator[None]:
    token = _ACTIVE_FEATURES.set(features)
    try:
        yield
    finally:
        _ACTIVE_FEATURES.reset(token)


def load_definitions(settings: Settings) -> list[FeastObject]:
    """Run `definitions.py` for these settings and return its Feast objects, each once.

    It is run afresh (not imported) so that stores of different settings in one process, as in
    tests, each get objects pointing at their own data.
    """
    features = absolute_features(settings.features, Path.cwd())
    with _building_for(features):
        namespace = runpy.run_path(str(repo_dir(features) / DEFINITIONS_FILE), run_name="feature_repo")
    objects: dict[int, FeastObject] = {}
    for value in namespace.values():
        if isinstance(value, Entity | DataSource | FeatureView | FeatureService):
            objects.setdefault(id(value), value)
    return list(objects.values())


def _expand(value: str, key: str) -> str:
    """Expand `${VAR}` as Feast does in its YAML; an unset variable is an error naming the key.

    The cluster profile reads `features.registry_uri: ${FEAST_REGISTRY_URI}` from a Secret.
    """
    expanded = os.path.expandvars(value)
    unset = re.search(r"\$\{\w+\}", expanded)
    if unset:
        raise ConfigError(f"{key}: environment variable {unset.group(0)} is not set")
    return expanded


def repo_config(settings: Settings, project: str = PROJECT) -> RepoConfig:
    """The profile's feature_store.yaml with the stores moved to where the settings say.

    No registry URI means a file registry in the data folder; no Redis URL means sqlite there.
    """
    features = absolute_features(settings.features, Path.cwd())
    root = repo_dir(features)
    raw: dict[str, Any] = yaml.safe_load((root / STORE_YAML[settings.profile]).read_text())
    raw["project"] = project
    if features.registry_uri:
        registry = raw["registry"] if isinstance(raw["registry"], dict) else {}
        registry.update(registry_type="sql", path=_expand(features.registry_uri, "features.registry_uri"))
        raw["registry"] = registry
    else:
        raw["registry"] = {"registry_type": "file", "path": data_path(features, REGISTRY_FILE)}
    if features.redis_url:
        raw["online_store"] = {
            "type": "redis",
            "connection_string": _expand(features.redis_url, "features.redis_url"),
        }
    elif is_remote(features.data_dir):
        raise ConfigError("features.redis_url: required when features.data_dir is remote (sqlite is a file)")
    else:
        raw["online_store"] = {"type": "sqlite", "path": data_path(features, ONLINE_FILE)}
    config = RepoConfig(**raw)
    config.repo_path = root
    return config


def open_store(settings: Settings, project: str = PROJECT) -> FeatureStore:
    """A FeatureStore for the profile with the definitions applied (applying again changes nothing).

    Args:
        settings: The configuration; `settings.features` says where the stores are.
        project: Feast project; tests pass a unique one to share a Redis or registry safely.
    """
    config = repo_config(settings, project)
    if not is_remote(settings.features.data_dir):
        Path(absolute_features(settings.features, Path.cwd()).data_dir).mkdir(parents=True, exist_ok=True)
    store = FeatureStore(repo_path=str(config.repo_path), config=config)
    objects = load_definitions(settings)
    store.apply(objects)
    kind = getattr(config.registry, "registry_type", "file")
    logger.info("feature store %s: %d objects applied (%s registry)", project, len(objects), kind)
    return store
