"""Step 6: the offline gate's verdict recorded on the version; `challenger` when it enters the canary."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from llm_auction.config import Settings
from llm_auction.evaluation.card import EVALUATION_FILE, review_card
from llm_auction.evaluation.gate import Check, GateInputs, decide
from llm_auction.pipeline.steps.common import finish_epoch, settings_from
from llm_auction.tracking import registry


def gate(settings_json: str, evaluation_dir: str, version: str, parent_run_id: str) -> dict:
    """Step 6: card and tags on the version; `challenger` (the canary) when the offline gate admits it.

    Both branches of the pipeline's `dsl.If` end here: a held candidate is recorded just the same.
    """
    settings = settings_from(settings_json)
    summary = json.loads((Path(evaluation_dir) / EVALUATION_FILE).read_text())
    decision = gate_step(settings, summary, version)
    finish_epoch(settings_json, parent_run_id, "FINISHED", {"llm_auction.admitted": decision["admitted"]})
    return decision


def gate_step(
    settings: Settings, summary: Mapping[str, Any], candidate_version: str, who: str = "irpo-pipeline"
) -> dict[str, Any]:
    """Tag the candidate version with its card and, if the offline gate admits it, make it the
    challenger: it enters the canary, where live traffic decides its promotion (`canary`).

    One canary at a time: while another challenger is still in canary the candidate is held. An
    admitted candidate is also the `head`, which the next epoch improves under `irpo.start_policy: head`.
    """
    name = settings.irpo.registered_model
    inputs = dict(summary["gate_inputs"])
    inputs["gain_ci"] = tuple(inputs["gain_ci"])
    offline = decide(GateInputs(**inputs), settings.gate)
    running = registry.alias_version(settings.tracking, name, registry.CHALLENGER)
    busy = running is not None and running != candidate_version
    slot = Check(
        "canary slot free", 0.0 if busy else 1.0, ">", 0.0, not busy, f"v{running} in canary" if busy else ""
    )
    decision = dataclasses.replace(offline, admit=offline.admit and not busy, checks=[*offline.checks, slot])
    run_id = summary.get("mlflow_run_id")
    links = (
        {
            "report": f"runs:/{run_id}/evaluation/report.html",
            "plot": f"runs:/{run_id}/evaluation/comparison.png",
        }
        if run_id
        else None
    )
    card = review_card({**summary, "gate": decision.to_dict()}, f"{name} v{candidate_version}", links)
    candidate = summary["policies"]["candidate"]
    tags = {
        **{f"lineage.{k}": v for k, v in summary.get("lineage", {}).items()},
        "gate.admitted": str(decision.admit).lower(),
        "gate.failed": ",".join(decision.failed) or "none",
        "metric.kl": round(summary["kl"], 5),
        **{
            f"metric.gain_{k}": round(g["mean"], 5)
            for k, g in summary["gain"].items()
            if g["mean"] is not None
        },
        **{f"metric.{k}": round(v["mean"], 5) for k, v in candidate.items() if v["mean"] is not None},
    }
    registry.annotate_version(settings.tracking, name, candidate_version, tags, description=card)
    if decision.admit:
        registry.enter_canary(settings.tracking, name, candidate_version, who)
        registry.set_alias(settings.tracking, name, registry.HEAD, candidate_version)
    return decision.to_dict()
