"""The IRPO steps as the pipeline and the CLI run them: files in, files out, tracked in MLflow."""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from llm_auction.config import Settings
from llm_auction.irpo.dpo import file_digest, train_dpo
from llm_auction.irpo.sampling import build_preference_set, feast_reward_scorer, prompt_requests
from llm_auction.simulator.experiment import Environment, split_requests, user_profiles
from llm_auction.tracking.registry import register_version
from llm_auction.tracking.runs import lineage_tags, tracked_run

logger = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
SAMPLES_FILE = "samples.parquet"
STATS_FILE = "pairs_stats.json"


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain process: the one that logs, saves and registers."""
    return int(os.environ.get("RANK", "0")) == 0


def learnable_requests(env: Environment) -> list:
    """Every request but the held-out ones: what prompts may be drawn from."""
    total = len(env.world.requests)
    _, held_out = split_requests(env)
    return env.world.auction_requests(limit=total - len(held_out))


def pairs_step(
    env: Environment,
    policy_dir: Path,
    pctr_dir: Path,
    out_dir: Path,
    online_request_ids: Sequence[str] = (),
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Sample M responses per prompt from pi_{t-1}, score them with R under psi_t, write the pairs.

    The user and ad features come from Feast's online store, as they would for a live request.
    """
    from llm_auction.policy.generation import make_generator

    settings = env.settings
    cfg = settings.irpo
    scorer = feast_reward_scorer(settings, pctr_dir)
    rng = np.random.default_rng([settings.seed, 11, int((lineage or {}).get("epoch", 0))])
    requests = prompt_requests(learnable_requests(env), online_request_ids, cfg, rng)
    generator = make_generator(settings.policy.generation, policy_dir)
    result = build_preference_set(
        generator, scorer, requests, user_profiles(env.world), cfg, int(rng.integers(2**31))
    )
    scorer.flush()
    out_dir.mkdir(parents=True, exist_ok=True)
    result.pairs.to_parquet(out_dir / PAIRS_FILE, index=False)
    result.samples.to_parquet(out_dir / SAMPLES_FILE, index=False)
    stats = {
        **result.stats,
        "policy": str(policy_dir),
        "pctr": str(pctr_dir),
        "pairs_sha256": file_digest(out_dir / PAIRS_FILE),
        "lineage": dict(lineage or {}),
    }
    (out_dir / STATS_FILE).write_text(json.dumps(stats, indent=2, default=str) + "\n")
    tags = lineage_tags("build_preferences", lineage or {})
    parent = (lineage or {}).get("parent_run_id")
    with tracked_run(settings.tracking, "irpo-pairs", tags, parent_run_id=parent) as run:
        if run is not None:
            params = cfg.model_dump(exclude={"dpo", "distributed"})
            run.log_params({"policy": policy_dir, "pctr": pctr_dir, **params})
            run.log_metrics({k: v for k, v in result.stats.items() if isinstance(v, float)})
            run.log_artifacts(out_dir, "pairs")
            stats["mlflow_run_id"] = run.run_id
    return stats


def read_pairs(path: Path) -> pd.DataFrame:
    """A pair set written by `pairs_step` (a folder or the parquet file itself)."""
    file = path / PAIRS_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"pairs {path}: no {PAIRS_FILE} found; run `llm-auction irpo pairs` first")
    return pd.read_parquet(file)


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
        summary = train_dpo(settings, policy_dir, pairs, out_dir, log, max_steps)
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
        card_path = out_dir / "policy_card.json"
        card = json.loads(card_path.read_text())
        card["lineage"] = lineage
        card["mlflow_run_id"] = summary.get("mlflow_run_id")
        card["registered_version"] = summary.get("registered_version")
        card_path.write_text(json.dumps(card, indent=2, default=str) + "\n")
    return summary
