"""The pCTR step: train psi on a training frame, save it, log it to MLflow and register a version."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from llm_auction.config import Settings
from llm_auction.features.encoder import TextEncoder
from llm_auction.reward.pctr import PCTRModel, train_pctr
from llm_auction.tracking.registry import register_version
from llm_auction.tracking.runs import lineage_tags, tracked_run

logger = logging.getLogger(__name__)


def train_and_register(
    settings: Settings,
    frame: pd.DataFrame,
    encoder: TextEncoder,
    out_dir: Path,
    lineage: Mapping[str, Any] | None = None,
) -> tuple[PCTRModel, dict[str, Any]]:
    """Train on `frame` (a point-in-time training set with `clicked`), save to `out_dir`, track it.

    `lineage` (data window, epoch, pipeline run id, ...) goes into the run's tags and the version's.
    """
    model = train_pctr(frame, encoder, settings.pctr, settings.seed)
    model.save(out_dir)
    test = model.metrics["test"]
    card: dict[str, Any] = {
        "model": str(out_dir),
        "rows": len(frame),
        "click_rate": float(frame["clicked"].mean()),
        "epochs": model.metrics["epochs"],
        "best_epoch": model.metrics["best_epoch"],
        **{f"test_{k}": test[k] for k in ("auc", "log_loss", "ece", "n")},
        "calibration_by_position": test["calibration_by_position"],
        "lineage": dict(lineage or {}),
    }
    tags = lineage_tags("train_pctr", lineage or {})
    parent = (lineage or {}).get("parent_run_id")
    with tracked_run(settings.tracking, "train-pctr", tags, parent_run_id=parent) as run:
        if run is not None:
            run.log_params({"seed": settings.seed, "rows": len(frame), **settings.pctr.model_dump()})
            run.log_metrics({f"test_{k}": test[k] for k in ("auc", "log_loss", "ece")})
            for step, loss in enumerate(model.metrics["validation_log_loss_curve"], start=1):
                run.log_metrics({"validation_log_loss": loss}, step=step)
            run.log_artifacts(out_dir, "pctr")
            card["mlflow_run_id"] = run.run_id
            card["registered_version"] = register_version(
                settings.tracking,
                settings.pctr.registered_model,
                run.run_id,
                "pctr",
                tags={**tags, "test_auc": round(test["auc"], 4), "test_ece": round(test["ece"], 4)},
                description=(
                    f"pCTR psi: test AUC {test['auc']:.3f}, ECE {test['ece']:.4f} on {test['n']} impressions"
                ),
            )
    (out_dir / "pctr_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    logger.info("pCTR trained: test AUC %.3f ECE %.4f", test["auc"], test["ece"])
    return model, card
