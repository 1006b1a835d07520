"""Step 4: DPO of pi_{t-1} -> pi_t, in this process, under torchrun or as a TrainJob."""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm_auction.config import Settings
from llm_auction.errors import LaunchError
from llm_auction.irpo.dpo import train_dpo as run_dpo_training
from llm_auction.irpo.launch import run_torchrun
from llm_auction.irpo.pairs import PAIRS_FILE, file_digest, read_pairs
from llm_auction.irpo.trainjob import run_trainjob
from llm_auction.pipeline.steps.common import is_main_process, settings_from
from llm_auction.policy.model import CARD_FILE, write_card
from llm_auction.tracking.registry import MODELS_PREFIX, register_version, registered_version, resolve_model
from llm_auction.tracking.runs import lineage_tags, tracked_run


def _dpo_args(
    policy: Path, pairs: str, out: Path, epoch: int, lineage: Mapping[str, str], config: Path
) -> list[str]:
    return [
        "--policy", str(policy), "--pairs", pairs, "--out", str(out), "--epoch", str(epoch),
        "--pctr-version", lineage["pctr_version"], "--parent-run-id", lineage["parent_run_id"],
        "--base-version", lineage["base_version"], "--settings-json", str(config),
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
    settings = settings_from(settings_json)
    dist = settings.irpo.distributed
    # The version the adapter is trained on: a server can serve pi_t as that version plus the adapter.
    base = (
        registered_version(settings.tracking, policy_uri)[1] if policy_uri.startswith(MODELS_PREFIX) else ""
    )
    lineage = {"pctr_version": pctr_version, "parent_run_id": parent_run_id, "base_version": base}
    work = (
        Path(dist.workspace_mount) / "irpo" / f"epoch-{epoch}" if dist.num_nodes > 1 else Path(out_dir).parent
    )
    policy = resolve_model(settings.tracking, policy_uri, work / "reference")
    config = work / "settings.json"
    if dist.num_nodes > 1 or dist.nproc_per_node > 1:
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(settings_json)
    if dist.num_nodes > 1:
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
    card_path = Path(out_dir) / CARD_FILE
    if not card_path.is_file():
        raise LaunchError(f"DPO finished without writing {card_path}")
    card = json.loads(card_path.read_text())
    return {
        "registered_version": card.get("registered_version") or "",
        "dpo": card.get("dpo", {}),
        "reference": str(policy),
    }


def dpo_step(
    settings: Settings,
    policy_dir: Path,
    pairs_path: Path,
    out_dir: Path,
    lineage: Mapping[str, Any] | None = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """DPO of pi_{t-1} on the pairs -> pi_t; rank 0 logs to MLflow and registers the new policy version.

    Lineage (epoch, pCTR version, pipeline run, ...) goes into the run's and the version's tags,
    beside the pair set's digest and the parent policy.
    """
    pairs = read_pairs(pairs_path)
    pairs_file = pairs_path / PAIRS_FILE if pairs_path.is_dir() else pairs_path
    lineage = {
        "pairs": str(pairs_file),
        "pairs_sha256": file_digest(pairs_file),
        "parent": str(policy_dir),
        **(lineage or {}),
    }
    tags = lineage_tags("train_dpo", lineage)
    main = is_main_process()
    parent = lineage.get("parent_run_id")
    run_context = (
        tracked_run(settings.tracking, "irpo-dpo", tags, parent_run_id=parent)
        if main
        else contextlib.nullcontext()
    )
    with run_context as run:
        log = (lambda metrics, step: run.log_metrics(metrics, step=step)) if run is not None else None
        summary = run_dpo_training(settings, policy_dir, pairs, out_dir, log, max_steps)
        if run is not None:
            run.log_params(
                {
                    "seed": settings.seed,
                    **settings.irpo.dpo.model_dump(),
                    **{f"lora_{k}": v for k, v in settings.policy.lora.model_dump().items()},
                    **{f"distributed_{k}": v for k, v in settings.irpo.distributed.model_dump().items()},
                }
            )
            run.log_metrics({f"final_{k}": summary[k] for k in ("train_loss", "seconds", "steps")})
            run.log_artifacts(out_dir, "policy")
            summary["mlflow_run_id"] = run.run_id
            summary["registered_version"] = register_version(
                settings.tracking,
                settings.irpo.registered_model,
                run.run_id,
                "policy",
                tags=tags,
                description=(
                    f"IRPO policy from {policy_dir.name}: DPO on {summary['pairs']} pairs of "
                    f"{summary['prompts']} prompts, final loss {summary['last_loss']:.4f}"
                ),
            )
    if main:
        card = json.loads((out_dir / CARD_FILE).read_text())
        card["lineage"] = lineage
        card["mlflow_run_id"] = summary.get("mlflow_run_id")
        card["registered_version"] = summary.get("registered_version")
        write_card(out_dir, card)
    return summary
