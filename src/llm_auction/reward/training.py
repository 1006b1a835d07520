"""The pCTR step: train psi on a training frame, save it, log it to MLflow, register a version, gate it.

The gate decides what serves: a new version takes the pCTR model's `champion` alias (what the
policy server prices with, and what the closed loop waits for) only when `reward.gate.decide_pctr`
finds its test AUC and ECE no worse than the champion psi's on the same held-out rows; held or
promoted, the version carries the decision and the numbers in its tags and description. The
pipeline's own later steps (pairs, evaluation) use the psi_t just trained from its directory,
whatever the gate said.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from llm_auction.config import Settings
from llm_auction.features.encoder import TextEncoder
from llm_auction.reward.gate import PCTRGateDecision, decide_pctr
from llm_auction.reward.pctr import PCTRModel, evaluate, split_by_request, train_pctr
from llm_auction.tracking import registry
from llm_auction.tracking.registry import register_version
from llm_auction.tracking.runs import lineage_tags, tracked_run

logger = logging.getLogger(__name__)
GATE_WHO = "pctr-gate"


def champion_metrics(
    settings: Settings, frame: pd.DataFrame, encoder: TextEncoder
) -> tuple[str | None, dict[str, Any] | None]:
    """(champion version, its `evaluate` metrics on `frame`'s test split), or (None, None) without one.

    The test split is the deterministic hash of request_id under `settings.pctr`, the same rows the
    new version was tested on, so the two are compared on equal terms. The version is read once and
    fetched by number, so the numbers belong to the version named even if the alias moves meanwhile.
    """
    name = settings.pctr.registered_model
    version = registry.alias_version(settings.tracking, name, registry.CHAMPION)
    if version is None:
        return None, None
    test = frame[split_by_request(frame["request_id"], settings.pctr) == "test"]
    with tempfile.TemporaryDirectory(prefix="llm-auction-pctr-champion-") as scratch:
        directory = registry.resolve_model(settings.tracking, f"models:/{name}/{version}", Path(scratch))
        return version, evaluate(PCTRModel.load(directory), test, encoder)


def _gate_card(decision: PCTRGateDecision, previous: str | None, after: str | None) -> dict[str, Any]:
    return {**decision.to_dict(), "champion_before": previous, "champion_after": after}


def train_and_register(
    settings: Settings,
    frame: pd.DataFrame,
    encoder: TextEncoder,
    out_dir: Path,
    lineage: Mapping[str, Any] | None = None,
) -> tuple[PCTRModel, dict[str, Any]]:
    """Train on `frame` (a point-in-time training set with `clicked`), save to `out_dir`, track it.

    `lineage` (data window, epoch, pipeline run id, ...) goes into the run's tags and the version's.
    With tracking on, the new version goes through psi's gate (module docstring); the card's `gate`
    says what it decided, or that it was skipped (no registry).
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
    name = settings.pctr.registered_model
    parent = (lineage or {}).get("parent_run_id")
    with tracked_run(settings.tracking, "train-pctr", tags, parent_run_id=parent) as run:
        if run is not None:
            gate_params = {f"gate.{k}": v for k, v in settings.pctr.gate.model_dump().items()}
            params = settings.pctr.model_dump(exclude={"gate"})
            run.log_params({"seed": settings.seed, "rows": len(frame), **params, **gate_params})
            run.log_metrics({f"test_{k}": test[k] for k in ("auc", "log_loss", "ece")})
            for step, loss in enumerate(model.metrics["validation_log_loss_curve"], start=1):
                run.log_metrics({"validation_log_loss": loss}, step=step)
            run.log_artifacts(out_dir, "pctr")
            card["mlflow_run_id"] = run.run_id
            # The champion is measured before the new version exists: a registry that cannot
            # produce it fails the step without leaving an ungated version behind.
            champion_version, champion_test = champion_metrics(settings, frame, encoder)
            summary = (
                f"pCTR psi: test AUC {test['auc']:.3f}, ECE {test['ece']:.4f} on {test['n']} impressions"
            )
            version = register_version(
                settings.tracking,
                name,
                run.run_id,
                "pctr",
                tags={**tags, "test_auc": round(test["auc"], 4), "test_ece": round(test["ece"], 4)},
                description=summary,
            )
            card["registered_version"] = version
            decision = decide_pctr(test, champion_test, settings.pctr.gate, champion_version)
            run.log_metrics(
                {
                    "champion_auc_same_rows": decision.champion_auc,
                    "champion_ece_same_rows": decision.champion_ece,
                }
            )
            run.set_tags({"gate_decision": decision.decision})
            verdict = (
                f"promoted to champion (was {'v' + champion_version if champion_version else 'none'})"
                if decision.promote
                else f"held: champion stays v{champion_version}"
            )
            registry.annotate_version(
                settings.tracking,
                name,
                version,
                decision.tags(),
                description=f"{summary}\n\npCTR gate: {verdict}. {decision.reason}",
            )
            if decision.promote:
                registry.promote(settings.tracking, name, version, GATE_WHO, decision.reason)
            after = version if decision.promote else champion_version
            card["gate"] = _gate_card(decision, champion_version, after)
            logger.info("pCTR gate: v%s %s: %s", version, verdict, decision.reason)
    if "gate" not in card:
        card["gate"] = {
            "decision": "skipped",
            "promoted": False,
            "reason": "no tracking URI (tracking.uri is None): no registry, no champion alias to gate",
        }
    (out_dir / "pctr_card.json").write_text(json.dumps(card, indent=2, default=str) + "\n")
    logger.info("pCTR trained: test AUC %.3f ECE %.4f", test["auc"], test["ece"])
    return model, card
