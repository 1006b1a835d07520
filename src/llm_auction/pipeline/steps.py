"""One function per pipeline step: strings and paths in, a JSON-able summary out.

KFP components (`components/`) are thin wrappers over these, so the same code runs in a pod on the
cluster, in a `kfp.local` subprocess, and in a test. The settings travel between steps as the JSON
that `resolve_settings` validated once at the start of the run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from llm_auction.config import Settings, load_config
from llm_auction.errors import LaunchError

logger = logging.getLogger(__name__)

MODELS_PREFIX = "models:/"


def resolve_settings(profile: str, config_path: str = "", overrides_yaml: str = "") -> str:
    """Validate the run's configuration once; every later step reads the JSON this returns."""
    overrides = yaml.safe_load(overrides_yaml) if overrides_yaml.strip() else {}
    path = Path(config_path) if config_path else None
    return load_config(path, profile or None, overrides=overrides).model_dump_json()


def finite_metrics(values: Mapping[str, Any], keys: tuple[str, ...] | None = None) -> dict[str, float]:
    """What KFP's Metrics artifact can hold: finite numbers; NaN (e.g. no logged loss) is left out."""
    import math

    chosen = values if keys is None else {k: values[k] for k in keys if k in values}
    return {
        k: float(v)
        for k, v in chosen.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def settings_from(settings_json: str) -> Settings:
    return Settings.model_validate_json(settings_json)


def start_epoch(settings_json: str, epoch: int, run_name: str = "") -> str:
    """The epoch's parent MLflow run, left RUNNING until the gate step (or a failing step) ends it."""
    from llm_auction.tracking.runs import open_run

    settings = settings_from(settings_json)
    if settings.tracking.uri is None:
        return ""
    return open_run(settings.tracking, run_name or f"irpo-epoch-{epoch}", {"llm_auction.epoch": epoch}).run_id


def finish_epoch(settings_json: str, parent_run_id: str, status: str, tags: Mapping[str, Any]) -> None:
    settings = settings_from(settings_json)
    if not parent_run_id or settings.tracking.uri is None:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking.uri)
    for key, value in tags.items():
        client.set_tag(parent_run_id, key, str(value))
    client.set_terminated(parent_run_id, status=status)


@contextmanager
def failing_epoch(settings_json: str, parent_run_id: str) -> Iterator[None]:
    """A step that raises marks the epoch's parent run FAILED before the error reaches KFP."""
    try:
        yield
    except BaseException as exc:
        finish_epoch(
            settings_json, parent_run_id, "FAILED", {"llm_auction.error": f"{type(exc).__name__}: {exc}"}
        )
        raise


def resolve_policy(settings: Settings, uri: str, into: Path) -> Path:
    """A policy directory from a path, or from the registry: `models:/NAME@ALIAS` or `models:/NAME/VERSION`.

    The version is looked up through this run's tracking server (not MLflow's process-global
    registry URI), then its files are fetched from their artifact location into `into`.
    """
    if not uri.startswith(MODELS_PREFIX):
        return Path(uri)
    import mlflow.artifacts

    from llm_auction.errors import RegistryError
    from llm_auction.tracking import registry

    reference = uri.removeprefix(MODELS_PREFIX)
    name, _, alias = reference.partition("@")
    if not alias:
        name, _, version = reference.partition("/")
    else:
        version = registry.alias_version(settings.tracking, name, alias) or ""
    if not name or not version:
        raise RegistryError(
            f"policy_uri {uri!r}: no such registered version (is there a {alias or 'version'}?)"
        )
    into.mkdir(parents=True, exist_ok=True)
    source = registry.version_source(settings.tracking, name, version)
    return Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=source, dst_path=str(into), tracking_uri=settings.tracking.uri
        )
    )


def resolve_window(window_start: str, window_end: str, hours: float) -> tuple[str, str]:
    """The feedback window; a scheduled run passes only its end (`[[ScheduledTime]]`): start = end - hours."""
    import pandas as pd

    end = pd.Timestamp(window_end) if window_end else pd.Timestamp.now(tz="UTC")
    end = end.tz_localize("UTC") if end.tzinfo is None else end.tz_convert("UTC")
    start = pd.Timestamp(window_start) if window_start else end - pd.Timedelta(hours=hours)
    start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
    return start.isoformat(), end.isoformat()


def ingest(
    settings_json: str, feedback_dir: str, window_start: str, window_end: str, parent_run_id: str
) -> dict:
    """Step 1: the feedback window into Feast (validated, labeled, statistics, materialized)."""
    import dataclasses

    from llm_auction.features.encoder import TextEncoder
    from llm_auction.features.ingest import ingest_window
    from llm_auction.features.store import open_store
    from llm_auction.tracking.runs import tracked_run
    from llm_auction.world import generate_world

    settings = settings_from(settings_json)
    window_start, window_end = resolve_window(window_start, window_end, settings.features.window_hours)
    if not Path(feedback_dir).is_dir():
        raise FileNotFoundError(f"feedback_dir {feedback_dir}: not a folder")
    world = generate_world(settings.world, settings.seed)
    encoder = TextEncoder(cache_path=settings.data_dir / "encoder-cache.parquet")
    report = ingest_window(
        open_store(settings),
        settings,
        Path(feedback_dir),
        world.users,
        world.ads,
        window_start,
        window_end,
        encoder,
    )
    encoder.flush()
    summary = json.loads(json.dumps(dataclasses.asdict(report), default=str))
    with tracked_run(
        settings.tracking, "ingest", {"llm_auction.step": "ingest"}, parent_run_id or None
    ) as run:
        if run is not None:
            run.log_params({"window": report.window, "feedback_dir": feedback_dir})
            run.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
    return summary


def train_pctr(
    settings_json: str, out_dir: str, window_start: str, window_end: str, epoch: int, parent_run_id: str
) -> dict:
    """Step 2: psi_t on the point-in-time training set of every impression before the window's end."""
    from llm_auction.features.encoder import TextEncoder
    from llm_auction.features.ingest import labeled_impressions
    from llm_auction.features.retrieval import training_frame
    from llm_auction.features.store import open_store
    from llm_auction.reward.training import pctr_inputs, train_and_register

    settings = settings_from(settings_json)
    window_start, window_end = resolve_window(window_start, window_end, settings.features.window_hours)
    labeled = labeled_impressions(settings, None, window_end)
    if labeled.empty:
        raise ValueError(f"window {window_start}/{window_end}: no labeled impressions to train the pCTR on")
    frame = pctr_inputs(training_frame(open_store(settings), labeled, settings.features))
    encoder = TextEncoder(cache_path=settings.data_dir / "encoder-cache.parquet")
    lineage = {"epoch": epoch, "window": f"{window_start}/{window_end}", "parent_run_id": parent_run_id}
    _, card = train_and_register(settings, frame, encoder, Path(out_dir), lineage)
    encoder.flush()
    return card


def build_preferences(
    settings_json: str,
    policy_uri: str,
    pctr_dir: str,
    feedback_dir: str,
    out_dir: str,
    epoch: int,
    parent_run_id: str,
) -> dict:
    """Step 3: M samples per prompt from pi_{t-1}, scored by R under psi_t, paired."""
    from llm_auction.irpo.steps import pairs_step
    from llm_auction.simulator.experiment import build_environment
    from llm_auction.simulator.feedback import read_feedback

    settings = settings_from(settings_json)
    with tempfile.TemporaryDirectory() as scratch:
        policy = resolve_policy(settings, policy_uri, Path(scratch))
        impressions, _ = read_feedback(Path(feedback_dir))
        lineage = {"epoch": epoch, "policy": policy_uri, "parent_run_id": parent_run_id}
        return pairs_step(
            build_environment(settings),
            policy,
            Path(pctr_dir),
            Path(out_dir),
            impressions["request_id"].tolist(),
            lineage,
        )


def _dpo_args(
    policy: Path, pairs: str, out: Path, epoch: int, lineage: Mapping[str, str], config: Path
) -> list[str]:
    return [
        "--policy", str(policy), "--pairs", pairs, "--out", str(out), "--epoch", str(epoch),
        "--pctr-version", lineage["pctr_version"], "--parent-run-id", lineage["parent_run_id"],
        "--settings-json", str(config),
    ]  # fmt: skip


def train_dpo(
    settings_json: str,
    policy_uri: str,
    pairs_dir: str,
    out_dir: str,
    epoch: int,
    pctr_version: str,
    parent_run_id: str,
) -> dict:
    """Step 4: DPO of pi_{t-1} -> pi_t, in this process, under torchrun, or as a TrainJob (N nodes).

    A TrainJob's nodes share only the workspace volume, so its inputs and output live there.
    """
    from llm_auction.irpo.launch import run_torchrun
    from llm_auction.irpo.steps import dpo_step

    settings = settings_from(settings_json)
    dist = settings.irpo.distributed
    lineage = {"pctr_version": pctr_version, "parent_run_id": parent_run_id}
    work = (
        Path(dist.workspace_mount) / "irpo" / f"epoch-{epoch}" if dist.num_nodes > 1 else Path(out_dir).parent
    )
    policy = resolve_policy(settings, policy_uri, work / "reference")
    config = work / "settings.json"
    if dist.num_nodes > 1 or dist.nproc_per_node > 1:
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(settings_json)
    if dist.num_nodes > 1:
        import shutil

        from llm_auction.irpo.trainjob import run_trainjob

        staged = work / "pairs"
        shutil.copytree(pairs_dir, staged, dirs_exist_ok=True)
        result = work / "policy"
        run_trainjob(
            settings,
            f"irpo-dpo-epoch-{epoch}",
            _dpo_args(policy, str(staged), result, epoch, lineage, config),
        )
        shutil.copytree(result, out_dir, dirs_exist_ok=True)
    elif dist.nproc_per_node > 1:
        args = ["irpo", "dpo", *_dpo_args(policy, pairs_dir, Path(out_dir), epoch, lineage, config)]
        run_torchrun(dist.nproc_per_node, args)
    else:
        dpo_step(settings, policy, Path(pairs_dir), Path(out_dir), {"epoch": epoch, **lineage})
    card_path = Path(out_dir) / "policy_card.json"
    if not card_path.is_file():
        raise LaunchError(f"DPO finished without writing {card_path}")
    card = json.loads(card_path.read_text())
    return {
        "registered_version": card.get("registered_version") or "",
        "dpo": card.get("dpo", {}),
        "reference": str(policy),
    }


def evaluate(
    settings_json: str,
    candidate_dir: str,
    champion_policy_uri: str,
    pctr_dir: str,
    out_dir: str,
    epoch: int,
    version: str,
    parent_run_id: str,
) -> dict:
    """Step 5: the candidate against the champion (also its DPO reference) and the baselines; the verdict."""
    from llm_auction.evaluation.steps import evaluate_step
    from llm_auction.simulator.experiment import build_environment

    settings = settings_from(settings_json)
    with tempfile.TemporaryDirectory() as scratch:
        champion = resolve_policy(settings, champion_policy_uri, Path(scratch) / "champion")
        lineage = {"epoch": epoch, "candidate_version": version, "parent_run_id": parent_run_id}
        env = build_environment(settings)
        return evaluate_step(
            env, Path(candidate_dir), champion, champion, Path(pctr_dir), Path(out_dir), lineage
        )


def gate(settings_json: str, evaluation_dir: str, version: str, parent_run_id: str) -> dict:
    """Step 6: card and tags on the version, `challenger`, and `champion` moved when the gate passes.

    Both branches of the pipeline's `dsl.If` end here: a held candidate is recorded just the same.
    """
    from llm_auction.evaluation.steps import EVALUATION_FILE, gate_step

    settings = settings_from(settings_json)
    summary = json.loads((Path(evaluation_dir) / EVALUATION_FILE).read_text())
    decision = gate_step(settings, summary, version).to_dict()
    finish_epoch(settings_json, parent_run_id, "FINISHED", {"llm_auction.promoted": decision["promoted"]})
    return decision


def deploy(settings_json: str, version: str) -> dict:
    """Roll serving to the champion: the local pointer file, or the InferenceService canary."""
    from llm_auction.serving.rollout import roll_out

    return roll_out(settings_from(settings_json), version)
